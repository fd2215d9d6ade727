"""Parameters and combination steps shared by the task-vector methods.

Defaults follow one rule, so that sibling methods never silently differ:
``normalize`` is true exactly for the methods that elect a sign (TIES, DARE-TIES,
Breadcrumbs-TIES: their "disjoint mean" divides by the weights that agree) and for
linear; it is false for the methods that add task vectors (task arithmetic, DARE-linear,
Breadcrumbs). ``weight`` defaults to 1 and ``lambda`` to 1 everywhere. ``density`` has no
default: a sparsifying merge always says how much it keeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model_glue.merge.params import Param

WEIGHT = Param("weight", float, per_model=True, default=1.0, help="coefficient of this model")
DENSITY = Param(
    "density",
    float,
    per_model=True,
    help="fraction of task-vector entries kept",
    minimum=0.0,
    maximum=1.0,
)
LAMBDA = Param(
    "lambda", float, per_model=False, default=1.0, help="scale of the merged task vector"
)


def normalize(default: bool) -> Param:
    return Param(
        "normalize",
        bool,
        per_model=False,
        default=default,
        help="divide by the sum of the (agreeing) weights",
    )


def task_vectors_(base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    """tau_i = theta_i - theta_base, computed in place over the model tensors."""
    for m in models:
        m.sub_(base)
    return models


CHUNK = 1 << 17  # elements: the combination steps run chunk by chunk, in cache


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def weighted_sum_merge(
    base: torch.Tensor,
    taus: list[torch.Tensor],
    weights: Sequence[float],
    lam: float,
    normalize: bool,
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """base + lambda * sum_i w_i s_i tau_i [/ sum_i w_i]; ``s_i`` are rescale factors.

    The result is written over ``taus[0]``.
    """
    scales = scales or [1.0] * len(taus)
    total = float(sum(weights))
    # mergekit's guard: a (near) zero sum of weights leaves the sum undivided
    factor = lam / total if normalize and abs(total) >= 1e-8 else lam
    coefs = [w * s * factor for w, s in zip(weights, scales, strict=True)]
    out = taus[0].view(-1)
    flats = [t.view(-1) for t in taus]
    flat_base = base.view(-1)
    for a, b in _chunks(out.numel()):
        chunk = out[a:b]
        if coefs[0] != 1.0:
            chunk.mul_(coefs[0])
        for flat, c in zip(flats[1:], coefs[1:], strict=True):
            chunk.add_(flat[a:b], alpha=c)
        chunk.add_(flat_base[a:b])
    return taus[0]


def sign_consensus_merge(
    base: torch.Tensor,
    taus: list[torch.Tensor],
    weights: Sequence[float],
    lam: float,
    normalize: bool,
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES sign election and disjoint mean over (already sparsified) task vectors.

    With t_i = w_i s_i tau_i, the elected sign is that of sum_i t_i (ties: +). Only the
    nonzero t_i of that sign are kept; with ``normalize`` their sum is divided by the
    sum of their weights w_i. The kept sum is computed as E * sum_i relu(E t_i), with E
    the elected sign, which needs no per-model boolean masks. The result is written
    over ``taus[0]``.
    """
    scales = scales or [1.0] * len(taus)
    coefs = [w * s for w, s in zip(weights, scales, strict=True)]
    flats = [t.view(-1) for t in taus]
    flat_base = base.view(-1)
    n = flats[0].numel()
    size = min(n, CHUNK)
    elected_buf = torch.empty(size, dtype=flats[0].dtype)
    divisor_buf = torch.empty(size, dtype=flats[0].dtype) if normalize else None
    one = torch.ones((), dtype=flats[0].dtype)
    for a, b in _chunks(n):
        ts = [f[a:b] for f in flats]
        for t, c in zip(ts, coefs, strict=True):
            if c != 1.0:
                t.mul_(c)
        elected = elected_buf[: b - a]
        elected.copy_(ts[0])
        for t in ts[1:]:
            elected.add_(t)
        torch.copysign(one, elected, out=elected)
        kept = ts[0].mul_(elected).relu_()
        divisor = None
        if divisor_buf is not None:
            divisor = divisor_buf[: b - a]
            torch.sign(kept, out=divisor)
            if weights[0] != 1.0:
                divisor.mul_(weights[0])
        for t, w in zip(ts[1:], weights[1:], strict=True):
            t.mul_(elected).relu_()
            kept.add_(t)
            if divisor is not None:
                divisor.add_(t.sign_(), alpha=w)
        kept.mul_(elected)
        if divisor is not None:
            kept.div_(divisor)
            # 0/0 where no model agrees (nothing kept there): the merged delta is 0, as
            # with mergekit's divisor-of-1 rule.
            torch.nan_to_num_(kept, nan=0.0, posinf=math.inf, neginf=-math.inf)
        if lam != 1.0:
            kept.mul_(lam)
        kept.add_(flat_base[a:b])
    return taus[0]
