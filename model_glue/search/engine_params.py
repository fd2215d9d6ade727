"""A search's :class:`TrialSpec` in the merge engine's terms, for trials and for the final merge.

The search speaks of per-model weights (possibly one per layer group) and densities; the
engine (``model_glue.merge``) takes per-model parameter settings. One translation serves both
the in-memory trials and the pipeline's materialisation of the chosen merge, so the merge
that is written is exactly the merge that was scored.

Per-layer-group weights become the engine's per-tensor filters: the layout's name for layer
``i`` (``model.layers.<i>.``, ``transformer.h.<i>.``...) gets the weight of its group, and a last unfiltered entry gives every other tensor
(embeddings, final norm, lm_head) the last weight.
"""

from __future__ import annotations

from typing import Any

from model_glue.architectures import Layout
from model_glue.search.layer_groups import layer_group_of
from model_glue.search.records import TrialSpec, Weight


def engine_model_params(spec: TrialSpec, layout: Layout) -> dict[str, dict[str, Any]]:
    """Per model of ``spec``: its engine parameters (``weight`` and, if searched, ``density``)."""
    out: dict[str, dict[str, Any]] = {}
    for name, weight in spec.weights.items():
        params: dict[str, Any] = {"weight": weight_setting(weight, layout)}
        if spec.densities is not None and name in spec.densities:
            params["density"] = float(spec.densities[name])
        out[name] = params
    return out


def weight_setting(weight: Weight, layout: Layout) -> float | list[dict[str, Any]]:
    """A scalar weight as is; per-group weights as a list of ``{filter, value}`` entries."""
    if not isinstance(weight, tuple):
        return float(weight)
    num_layers = layout.num_layers
    groups = len(weight) - 1
    if not 1 <= groups <= num_layers:
        raise ValueError(f"{groups} layer groups requested but the model has {num_layers} layers")
    per_layer = [
        {
            "filter": layout.layer_filter(i),
            "value": float(weight[layer_group_of(i, num_layers, groups)]),
        }
        for i in range(num_layers)
    ]
    return per_layer + [{"value": float(weight[groups])}]
