"""SCE (FuseChat, Wan et al. 2024): select, calculate, erase, then a weighted mean.

Per tensor, as mergekit 0.1.5 computes it:
- select: with ``select_topk < 1``, keep the ``int(select_topk * m)`` entries whose task
  vectors vary most across the models (population variance; ``m`` counts the entries of
  nonzero variance; ties: lower flat index first) and zero the rest of every task vector;
- calculate: model ``i``'s weight is the mean square of its (selected) task vector,
  divided by the sum over models (equal weights when that sum is below 1e-6);
- erase: elect per entry the sign of the sum of the task vectors (a zero sum elects +)
  and drop the entries of other sign (zeros included);
- merge: ``base + sum_i w_i tau_i / max(sum_i w_i, 1e-6)`` over the kept entries.

Not chunked: the selection needs a top-k over the whole tensor. Beyond the engine's
float32 copies of the inputs it holds the variances, a selection mask and block-sized
buffers. Sums are float64 per block, added exactly across blocks: no thread dependence.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model_glue.merge.methods._common import task_vectors_
from model_glue.merge.params import Param
from model_glue.merge.registry import CHUNK, merge_method
from model_glue.merge.sparsify import top_k_mask

SELECT_TOPK = Param(
    "select_topk",
    float,
    per_model=False,
    default=1.0,
    help="fraction of entries kept: those where the task vectors vary most across models",
    minimum=0.0,
    maximum=1.0,
)


def _blocks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def select_(taus: list[torch.Tensor], fraction: float) -> None:
    """Zero, in every task vector, the entries outside the ``fraction`` of highest variance
    across the models (population variance, as ``torch.var(unbiased=False)``)."""
    flats = [t.view(-1) for t in taus]
    n = flats[0].numel()
    var = torch.empty(n, dtype=torch.float32)
    for a, b in _blocks(n):
        var[a:b] = torch.var(torch.stack([f[a:b] for f in flats]), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction) if fraction > 0 else 0
    if k == 0:
        for f in flats:
            f.zero_()
        return
    keep = top_k_mask(var, k)
    del var
    for f in flats:
        f.mul_(keep)


def sce_weights(taus: list[torch.Tensor]) -> list[float]:
    """Each task vector's mean square over the sum of them (equal below 1e-6)."""
    n = taus[0].numel()
    squares = []
    for t in taus:
        values = t.view(-1).numpy()
        sums = []
        for a, b in _blocks(n):
            block = values[a:b].astype(np.float64)
            sums.append(float(np.add.reduce(np.multiply(block, block, out=block))))
        squares.append(math.fsum(sums) / max(n, 1))
    total = math.fsum(squares)
    if abs(total) < 1e-6:
        return [1.0 / len(taus)] * len(taus)
    return [float(np.float32(s / total)) for s in squares]


def erase_and_merge(
    base: torch.Tensor, taus: list[torch.Tensor], weights: list[float]
) -> torch.Tensor:
    """base + the weighted mean of the entries that agree with the elected sign, written
    over ``base``."""
    flats = [t.view(-1) for t in taus]
    out = base.view(-1)
    n = out.numel()
    size = min(n, CHUNK)
    elected_buf = torch.empty(size)
    merged_buf = torch.empty(size)
    divisor_buf = torch.empty(size)
    one = torch.ones(())
    for a, b in _blocks(n):
        ts = [f[a:b] for f in flats]
        elected = elected_buf[: b - a]
        merged = merged_buf[: b - a].zero_()
        divisor = divisor_buf[: b - a].zero_()
        elected.copy_(ts[0])
        for t in ts[1:]:
            elected.add_(t)
        torch.where(elected >= 0, one, -one, out=elected)
        for t, w in zip(ts, weights, strict=True):
            kept = t.mul_(elected).relu_()  # |tau| where its sign is the elected one
            merged.add_(kept, alpha=w)
            divisor.add_(kept.sign_(), alpha=w)
        merged.div_(divisor.clamp_(min=1e-6)).mul_(elected)
        out[a:b].add_(merged)
    return base


@merge_method(
    "sce",
    params=(SELECT_TOPK,),
    base="required",
    summary="keep the entries where the task vectors vary most, weight each model by its task vector's mean square, drop entries against the elected sign, weighted mean",
    reference="https://arxiv.org/abs/2408.07990",
)
def sce_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    if params["select_topk"] < 1:
        select_(taus, params["select_topk"])
    return erase_and_merge(base, taus, sce_weights(taus))
