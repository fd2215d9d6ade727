"""Parameters and combination steps shared by the task-vector methods.

Defaults follow one rule, so that sibling methods never silently differ:
``normalize`` is true exactly for the methods that elect a sign (TIES, DARE-TIES,
Breadcrumbs-TIES, DELLA: their "disjoint mean" divides by the weights that agree) and for
linear; it is false for the methods that add task vectors (task arithmetic, DARE-linear,
Breadcrumbs, DELLA-linear). ``weight`` defaults to 1 and ``lambda`` to 1 everywhere.
``density`` has no default: a sparsifying merge always says how much it keeps. ``seed``
(default 0) seeds the random masks of DARE and DELLA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model_glue.merge.params import Param
from model_glue.merge.registry import CHUNK

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
SEED = Param("seed", int, per_model=False, default=0, help="seed of the random drop masks")


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

    With t_i = c_i tau_i and c_i = w_i s_i, the elected sign E is that of sum_i t_i
    (ties: +). Only the nonzero t_i of sign E are kept; with ``normalize`` their sum is
    divided by the sum of their weights w_i (0/0, where nothing is kept, gives 0).

    Computed without per-model masks or per-model scaling passes: with a_i = |c_i| and
    tau'_i = sign(c_i) tau_i (so t_i = a_i tau'_i), E = sign(tau'_0 + sum_i (a_i/a_0)
    tau'_i) and the kept sum is a_0 E (relu(E tau'_0) + sum_i (a_i/a_0) relu(E tau'_i)).
    Models with c_i = 0 contribute nothing and are skipped. The result is written over
    the first contributing task vector (or ``base`` when none contributes).
    """
    scales = scales or [1.0] * len(taus)
    coefs = [w * s for w, s in zip(weights, scales, strict=True)]
    live = [i for i, c in enumerate(coefs) if c != 0.0]
    if not live:
        return base
    a0 = abs(coefs[live[0]])
    flats = [taus[i].view(-1) for i in live]
    ratios = [abs(coefs[i]) / a0 for i in live]
    negative = [coefs[i] < 0 for i in live]
    ws = [weights[i] for i in live]
    flat_base = base.view(-1)
    n = flats[0].numel()
    size = min(n, CHUNK)
    elected_buf = torch.empty(size, dtype=flats[0].dtype)
    divisor_buf = torch.empty(size, dtype=flats[0].dtype) if normalize else None
    one = torch.ones((), dtype=flats[0].dtype)
    for a, b in _chunks(n):
        ts = [f[a:b] for f in flats]
        for t, neg in zip(ts, negative, strict=True):
            if neg:
                t.neg_()
        elected = elected_buf[: b - a]
        if len(ts) == 1:
            elected.copy_(ts[0])
        else:
            torch.add(ts[0], ts[1], alpha=ratios[1], out=elected)
            for t, r in zip(ts[2:], ratios[2:], strict=True):
                elected.add_(t, alpha=r)
        torch.copysign(one, elected, out=elected)
        kept = ts[0].mul_(elected).relu_()
        divisor = None
        if divisor_buf is not None:
            divisor = divisor_buf[: b - a]
            torch.sign(kept, out=divisor)
            if ws[0] != 1.0:
                divisor.mul_(ws[0])
        for t, r, w in zip(ts[1:], ratios[1:], ws[1:], strict=True):
            t.mul_(elected).relu_()
            kept.add_(t, alpha=r)
            if divisor is not None:
                divisor.add_(t.sign_(), alpha=w)
        if divisor is not None:
            kept.div_(divisor)
            torch.nan_to_num_(kept, nan=0.0, posinf=math.inf, neginf=-math.inf)
        torch.addcmul(flat_base[a:b], kept, elected, value=lam * a0, out=kept)
    return taus[live[0]]
