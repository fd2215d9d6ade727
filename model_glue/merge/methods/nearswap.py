"""NearSwap: take the model's value where it is near the base, keep the base elsewhere.

Per element, with ``d = |base - model|``: ``w = clamp(t / max(d, 1e-6), 0, 1)`` and the
result is ``w * model + (1 - w) * base``: elements closer than ``t`` take the model's
value, farther ones move toward it by ``t / d``. As mergekit 0.1.5 computes it, operation
for operation. Elementwise, so it streams in chunks.
"""

from __future__ import annotations

import torch

from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method


@merge_method(
    "nearswap",
    params=(
        Param(
            "t",
            float,
            per_model=False,
            help="distance below which an element takes the model's value",
            minimum=0.0,
        ),
    ),
    base="required",
    summary="per element, interpolate from the base toward the model by t / |base - model|, clamped to [0, 1]",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    min_models=1,
    max_models=1,
    chunked=True,
)
def nearswap_merge(base, models, params, ctx):
    model = models[0]
    # t / d is evaluated as reciprocal(d) * t, as torch evaluates mergekit's `t / tensor`
    weight = torch.sub(base, model).abs_().clamp_(min=1e-6).reciprocal_().mul_(params["t"])
    weight.clamp_(0, 1)
    model.mul_(weight)
    return base.mul_(weight.neg_().add_(1)).add_(model)
