"""DARE (Yu et al. 2024): drop task-vector entries at random, rescale, then combine.

``dare_linear`` adds the rescaled task vectors; ``dare_ties`` combines them with the TIES
sign election. Masks are seeded per (seed, tensor, model): see ``sparsify.RandomKeep``.

``rescale``: ``inverse_density`` multiplies the kept entries by 1/p (the DARE paper);
``l1`` restores each task vector's L1 norm (what mergekit 0.1.5 does with
``rescale: true``); ``none`` keeps them as they are.
"""

from __future__ import annotations

import numpy as np

from model_glue.merge.methods._common import (
    DENSITY,
    LAMBDA,
    SEED,
    WEIGHT,
    normalize,
    sign_consensus_merge,
    task_vectors_,
    weighted_sum_merge,
)
from model_glue.merge.params import Param
from model_glue.merge.registry import CHUNK, merge_method
from model_glue.merge.sparsify import Drop, RandomKeep, drop_, kept_l1, mask_seed

RESCALE = Param(
    "rescale",
    str,
    per_model=False,
    default="inverse_density",
    help="how kept entries are rescaled",
    choices=("inverse_density", "l1", "none"),
    aliases={True: "inverse_density", False: "none"},
)


def _keeps(params, ctx) -> list[RandomKeep]:
    """Each model's RandomKeep for this tensor (kept in the memo across chunks)."""
    memo = ctx.memo if ctx.memo is not None else {}
    if "keep" not in memo:
        memo["keep"] = [
            RandomKeep(density, mask_seed(params["seed"], ctx.tensor_name, model))
            for density, model in zip(params["density"], ctx.model_names, strict=True)
        ]
    return memo["keep"]


def _l1_sums(base, models, params, ctx) -> list[float] | None:
    """The ``reduce`` of both DARE methods: each task vector's L1 norm before and after
    its drop, which the ``l1`` rescale needs over the whole tensor. The masks drawn here
    are kept in the memo for the second pass."""
    if params["rescale"] != "l1":
        return None
    taus = task_vectors_(base, models)
    scratch = ctx.memo.setdefault("scratch", np.empty(CHUNK, dtype=np.float32))
    sums = []
    for i, (tau, keep) in enumerate(zip(taus, _keeps(params, ctx), strict=True)):
        values = tau.view(-1).numpy()
        if not values.any():  # a frozen chunk: nothing to drop, no draws (same result)
            ctx.memo[("mask", i, ctx.offset)] = _FROZEN
            sums += (0.0, 0.0)
            continue
        mask = keep.draw(ctx.offset, len(values))
        ctx.memo[("mask", i, ctx.offset)] = mask
        sums += kept_l1(values, mask, scratch[: len(values)])
    return sums


_FROZEN = object()  # memo mark: this chunk of this task vector is all zeros


def _drop_and_rescale(taus, params, ctx) -> list[float]:
    """Drop in place; return each task vector's rescale factor."""
    rescale = params["rescale"]
    keeps = _keeps(params, ctx)
    drops = []
    for i, (tau, keep) in enumerate(zip(taus, keeps, strict=True)):
        mask = ctx.memo.pop(("mask", i, ctx.offset), None) if ctx.memo is not None else None
        if mask is _FROZEN:  # all zeros: dropping changes nothing
            drops.append(Drop(keep.p))
        elif mask is not None:  # drawn by _l1_sums
            values = tau.view(-1).numpy()
            np.multiply(values, mask, out=values)
            drops.append(Drop(keep.p))
        else:
            measure = rescale == "l1" and ctx.totals is None
            drops.append(drop_(tau, keep, offset=ctx.offset, measure_l1=measure))
    if rescale == "inverse_density":
        return [1.0 / d.p if d.p > 0 else 1.0 for d in drops]
    if rescale == "none":
        return [1.0] * len(drops)
    if ctx.totals is None:  # a whole tensor: the drop measured it
        sums = [(d.l1_before, d.l1_after) for d in drops]
    else:  # a chunk: the engine summed _l1_sums over the whole tensor
        sums = list(zip(ctx.totals[0::2], ctx.totals[1::2], strict=True))
    return [before / after if before >= 1e-7 and after >= 1e-7 else 1.0 for before, after in sums]


@merge_method(
    "dare_linear",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(False), RESCALE, SEED),
    base="required",
    summary="randomly drop task-vector entries, rescale, add to the base",
    reference="https://arxiv.org/abs/2311.03099",
    chunked=True,
    reduce=_l1_sums,
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
    chunked=True,
    reduce=_l1_sums,
)
def dare_ties_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    scales = _drop_and_rescale(taus, params, ctx)
    return sign_consensus_merge(
        base, taus, params["weight"], params["lambda"], params["normalize"], scales
    )
