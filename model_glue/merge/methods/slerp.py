"""SLERP: spherical interpolation between the base (t = 0) and one model (t = 1).

Each tensor is one vector. The angle comes from the normalised vectors; the
interpolation weights sin((1-t)theta)/sin(theta) and sin(t theta)/sin(theta) apply to the
raw tensors, so norms interpolate too. When |cos theta| > 0.9995 (nearly parallel or
antiparallel) it falls back to linear interpolation, as mergekit does.
"""

from __future__ import annotations

import math

import torch

from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate float32 tensors (overwrites ``v0``)."""
    n0 = float(torch.linalg.vector_norm(v0))
    n1 = float(torch.linalg.vector_norm(v1))
    n0 = n0 if n0 > NORM_EPS else 1.0
    n1 = n1 if n1 > NORM_EPS else 1.0
    dot = float(torch.dot(v0.view(-1), v1.view(-1))) / (n0 * n1)
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        a, b = 1.0 - t, t
    else:
        theta = math.acos(dot)
        a = math.sin((1 - t) * theta) / math.sin(theta)
        b = math.sin(t * theta) / math.sin(theta)
    return v0.mul_(a).add_(v1, alpha=b)


@merge_method(
    "slerp",
    params=(
        Param(
            "t", float, per_model=False, help="interpolation position: 0 is the base, 1 the model"
        ),
    ),
    base="required",
    summary="spherical interpolation between the base and one model, linear when nearly parallel",
    reference="https://en.wikipedia.org/wiki/Slerp",
    min_models=1,
    max_models=1,
)
def slerp_merge(base, models, params, ctx):
    return slerp(params["t"], base, models[0])
