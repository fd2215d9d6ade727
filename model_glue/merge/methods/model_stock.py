"""Model Stock (Jang et al. 2024): interpolate between the base and the models' average.

With N fine-tunes and cos theta the mean pairwise cosine of their task vectors,
t = N cos / (1 + (N - 1) cos) and the result is t * mean_i(theta_i) + (1 - t) * base.
``filter_wise`` computes the angle per output row instead of per tensor. When the
denominator vanishes the base is kept (mergekit's rule).
"""

from __future__ import annotations

import torch

from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method


@merge_method(
    "model_stock",
    params=(
        Param("filter_wise", bool, per_model=False, default=False, help="one angle per output row"),
    ),
    base="required",
    summary="interpolate between the base and the average of the models by their task-vector angle",
    reference="https://arxiv.org/abs/2403.19522",
    min_models=2,
)
def model_stock_merge(base, models, params, ctx):
    shape = base.shape
    if params["filter_wise"]:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        ws = [m if m.dim() > 1 else m.unsqueeze(0) for m in models]
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    average = torch.stack(ws).mean(dim=0)
    offsets = [w.sub_(w0) for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            cos = (offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            cosines.append(cos.clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(offsets)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(
        singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator)
    )
    return (t * average + (1 - t) * w0).reshape(shape)
