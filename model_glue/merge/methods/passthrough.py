"""Passthrough: one model's tensors as they are (optionally scaled): the method of
``slices:`` stacks, where each slice takes its layers from a single source."""

from __future__ import annotations

from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method


@merge_method(
    "passthrough",
    params=(
        Param("scale", float, per_model=True, default=1.0, help="factor applied to the tensor"),
    ),
    base="none",
    summary="one model's tensors unchanged (times scale): slices stack layers with it",
    reference="https://github.com/arcee-ai/mergekit#passthrough",
    min_models=1,
    max_models=1,
    chunked=True,
)
def passthrough_merge(base, models, params, ctx):
    (scale,) = params["scale"]
    return models[0] if scale == 1.0 else models[0].mul_(scale)
