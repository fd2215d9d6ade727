"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean."""

from __future__ import annotations

from model_glue.merge.methods._common import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    normalize,
    sign_consensus_merge,
    task_vectors_,
)
from model_glue.merge.registry import merge_method
from model_glue.merge.sparsify import magnitude_prune_


@merge_method(
    "ties",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(True)),
    base="required",
    summary="keep each task vector's top-density magnitudes, elect a sign per entry, average the agreeing entries",
    reference="https://arxiv.org/abs/2306.01708",
)
def ties_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    for tau, density in zip(taus, params["density"], strict=True):
        magnitude_prune_(tau, density)
    return sign_consensus_merge(base, taus, params["weight"], params["lambda"], params["normalize"])
