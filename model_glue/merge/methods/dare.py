"""DARE (Yu et al. 2024): drop task-vector entries at random, rescale, then combine.

``dare_linear`` adds the rescaled task vectors; ``dare_ties`` combines them with the TIES
sign election. Masks are seeded per (seed, tensor, model): see ``sparsify.random_drop_``.

``rescale``: ``inverse_density`` multiplies the kept entries by 1/p (the DARE paper);
``l1`` restores each task vector's L1 norm (what mergekit 0.1.5 does with
``rescale: true``); ``none`` keeps them as they are.
"""

from __future__ import annotations

from model_glue.merge.methods._common import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    normalize,
    sign_consensus_merge,
    task_vectors_,
    weighted_sum_merge,
)
from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method
from model_glue.merge.sparsify import mask_seed, random_drop_

RESCALE = Param(
    "rescale",
    str,
    per_model=False,
    default="inverse_density",
    help="how kept entries are rescaled",
    choices=("inverse_density", "l1", "none"),
    aliases={True: "inverse_density", False: "none"},
)
SEED = Param("seed", int, per_model=False, default=0, help="seed of the random drop masks")


def _drop_and_rescale(taus, params, ctx) -> list[float]:
    scales = []
    for tau, density, model in zip(taus, params["density"], ctx.model_names, strict=True):
        l1_before = float(tau.abs().sum()) if params["rescale"] == "l1" else 0.0
        p = random_drop_(tau, density, mask_seed(params["seed"], ctx.tensor_name, model))
        if params["rescale"] == "inverse_density":
            scales.append(1.0 / p if p > 0 else 1.0)
        elif params["rescale"] == "l1":
            l1_after = float(tau.abs().sum())
            scales.append(l1_before / l1_after if l1_before >= 1e-7 and l1_after >= 1e-7 else 1.0)
        else:
            scales.append(1.0)
    return scales


@merge_method(
    "dare_linear",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(False), RESCALE, SEED),
    base="required",
    summary="randomly drop task-vector entries, rescale, add to the base",
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_linear_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    scales = _drop_and_rescale(taus, params, ctx)
    return weighted_sum_merge(
        base, taus, params["weight"], params["lambda"], params["normalize"], scales
    )


@merge_method(
    "dare_ties",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(True), RESCALE, SEED),
    base="required",
    summary="randomly drop task-vector entries, rescale, TIES sign election and disjoint mean",
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_ties_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    scales = _drop_and_rescale(taus, params, ctx)
    return sign_consensus_merge(
        base, taus, params["weight"], params["lambda"], params["normalize"], scales
    )
