"""Task arithmetic (Ilharco et al. 2023): theta_base + lambda * sum_i w_i tau_i."""

from __future__ import annotations

from model_glue.merge.methods._common import (
    LAMBDA,
    WEIGHT,
    normalize,
    task_vectors_,
    weighted_sum_merge,
)
from model_glue.merge.registry import merge_method


@merge_method(
    "task_arithmetic",
    params=(WEIGHT, LAMBDA, normalize(False)),
    base="required",
    summary="add the weighted task vectors to the base",
    reference="https://arxiv.org/abs/2212.04089",
    chunked=True,
)
def task_arithmetic_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    return weighted_sum_merge(base, taus, params["weight"], params["lambda"], params["normalize"])
