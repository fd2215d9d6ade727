"""Which layer group a tensor belongs to, for per-layer-group merge coefficients.

The evolutionary search may give each model one weight per group of contiguous decoder
layers (G groups) plus one weight for everything else: embeddings, the final norm and
the output head. Group ``g`` of ``G`` holds layers ``[g * L / G, (g + 1) * L / G)``; index
``G`` is the "everything else" group. A tensor's layer number is its checkpoint's
:class:`~model_glue.architectures.Layout` (``layout.layer_of(name)``), whatever the family
calls its layers (``model.layers.N``, ``transformer.h.N``, ``gpt_neox.layers.N``...).
"""

from __future__ import annotations


def layer_group_of(layer: int | None, num_layers: int, groups: int) -> int:
    """Index of the layer group of decoder layer ``layer``: ``0..groups-1`` for decoder
    layers, ``groups`` for tensors outside them (``layer`` None)."""
    if groups < 1 or groups > num_layers:
        raise ValueError(
            f"layer groups must be between 1 and the {num_layers} layers, got {groups}"
        )
    if layer is None:
        return groups
    if layer >= num_layers:
        raise ValueError(f"layer {layer} is beyond the model's {num_layers} layers")
    return layer * groups // num_layers
