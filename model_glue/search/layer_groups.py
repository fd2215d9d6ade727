"""Which layer group a tensor belongs to, for per-layer-group merge coefficients.

The evolutionary search may give each model one weight per group of contiguous decoder
layers (G groups) plus one weight for everything else: embeddings, the final norm and
lm_head. Group ``g`` of ``G`` holds layers ``[g * L / G, (g + 1) * L / G)``; index ``G`` is
the "everything else" group. Kept here, next to the search, because it defines how a
per-group :class:`~model_glue.search.records.TrialSpec` is read.
"""

from __future__ import annotations

import re

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """Decoder layer number of a Hugging Face tensor name (``model.layers.3.mlp...`` -> 3)."""
    m = _LAYER_INDEX.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_group_of(tensor_name: str, num_layers: int, groups: int) -> int:
    """Index of the layer group of ``tensor_name``: ``0..groups-1`` for decoder layers,
    ``groups`` for tensors outside them."""
    if groups < 1 or groups > num_layers:
        raise ValueError(
            f"layer groups must be between 1 and the {num_layers} layers, got {groups}"
        )
    layer = layer_index(tensor_name)
    if layer is None:
        return groups
    if layer >= num_layers:
        raise ValueError(
            f"tensor {tensor_name!r} is in layer {layer} but the model has {num_layers} layers"
        )
    return layer * groups // num_layers
