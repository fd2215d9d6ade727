"""Arcee Fusion: keep the model's changes where they matter most, the base elsewhere.

As mergekit 0.1.5 computes it: the importance of element ``j`` of row ``r`` is
``|theta_j - base_j| * KL_r``, with ``KL_r = sum_j p_j log(p_j / q_j)`` between the
softmaxes of the model's and the base's row (each plus 1e-8; a 1-D tensor is one row).
Elements whose importance reaches ``median + 1.5 (q3 - q1)`` of the tensor's importances
(the upper outlier fence; quantile ``q`` is the sorted value at ``floor(q (n - 1))``) take
the model's value, the others keep the base's.

One difference: above 1M elements mergekit estimates the quantiles from 1M entries drawn
at random (unseeded); here they are exact, so a merge is reproducible. Not chunked: the
threshold is a quantile of the whole tensor.
"""

from __future__ import annotations

import torch

from model_glue.merge.registry import CHUNK, merge_method

SOFTMAX_EPS = 1e-8


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(model row) || softmax(base row)) per row along the last dimension
    (kept), in blocks of rows of about CHUNK elements: rows are independent, and the
    temporaries stay block-sized."""
    if model.dim() < 2:
        pairs = [(model, base)]
    else:
        step = max(1, CHUNK // max(1, model.shape[-1]))
        pairs = zip(model.split(step), base.split(step), strict=True)
    parts = []
    for m, b in pairs:
        p = torch.softmax(m, dim=-1).add_(SOFTMAX_EPS)
        q = torch.softmax(b, dim=-1).add_(SOFTMAX_EPS)
        parts.append(torch.sum(p * torch.log(p / q), dim=-1, keepdim=True))
    return torch.cat(parts)


def outlier_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1), quantile q at sorted index floor(q (n - 1)), in float32.
    Reorders ``importance`` (a partial sort in place)."""
    values = importance.view(-1).numpy()
    last = values.size - 1
    at = [last // 4, last // 2, 3 * last // 4]
    values.partition(at)
    q1, median, q3 = (torch.tensor(values[i]) for i in at)
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    params=(),
    base="required",
    summary="the model's entries of outlier importance (|change| times the row's softmax KL), the base's elsewhere",
    reference="https://arcee.ai",
    min_models=1,
    max_models=1,
)
def arcee_fusion_merge(base, models, params, ctx):
    kl = row_kl(models[0], base)
    tau = models[0].sub_(base)
    importance = torch.abs(tau).mul_(kl)
    threshold = outlier_threshold(importance)
    torch.abs(tau, out=importance).mul_(kl)  # the partial sort reordered it
    fused = importance.ge_(threshold)  # the float mask, 1 where kept
    return base.add_(tau.mul_(fused))
