"""NuSLERP: spherical interpolation between two models, or between their task vectors.

With weights ``w_0, w_1`` the position is ``t = w_1 / (w_0 + w_1)`` (0.5 when the sum is
within 1e-6 of 0). Each vector ``v_0, v_1`` (the models, or ``theta_i - base`` with a
base, which is added back) becomes ``(sin((1-t) theta) v_0 + sin(t theta) v_1) /
sin(theta)``, theta the angle between them; linear, ``(1-t) v_0 + t v_1``, where
``1 - cos^2 theta <= 1e-16``. A vector is the whole tensor (``nuslerp_flatten``, the
default), else each row (one angle per vector along the last dimension) or, with
``nuslerp_row_wise``, each column (along the first). Norms below 1e-7 count as 1e-7.
As mergekit 0.1.5 computes it, operation for operation on the tensors.

Not chunked: the row and column modes need one angle per row or column.
"""

from __future__ import annotations

import torch

from model_glue.merge.methods._common import WEIGHT
from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int | None) -> None:
    """Interpolate vectors along ``dim`` (None: the whole tensor) into ``v0``; overwrites ``v1``.

    The cosines are computed exactly as mergekit computes them (normalised copies, their
    products summed along the same view), with two tensor-sized temporaries: near
    antipodal vectors, the branch taken (linear or spherical) changes the result by
    O(1) and depends on the last bit of the cosine.
    """
    if dim is None:
        v0, v1 = v0.view(-1), v1.view(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = torch.sum(
        cos.mul_(v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)),
        dim=-1,
        keepdim=True,
    ).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta))
    b = torch.where(colinear, t, torch.sin(t * theta))
    divisor = torch.where(colinear, 1, torch.sin(theta))
    v0.mul_(a).add_(v1.mul_(b)).div_(divisor)  # in place through the views


@merge_method(
    "nuslerp",
    params=(
        WEIGHT,
        Param(
            "nuslerp_flatten",
            bool,
            per_model=False,
            default=True,
            help="one angle for the whole tensor (else one per row or column)",
        ),
        Param(
            "nuslerp_row_wise",
            bool,
            per_model=False,
            default=False,
            help="unflattened: one angle per column (vectors along the first dimension) instead of per row",
        ),
    ),
    base="optional",
    summary="spherical interpolation of two models, or of their task vectors, at t = w_1 / (w_0 + w_1)",
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    min_models=2,
    max_models=2,
)
def nuslerp_merge(base, models, params, ctx):
    w0, w1 = params["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    dim = None if params["nuslerp_flatten"] else (0 if params["nuslerp_row_wise"] else -1)
    v0, v1 = models
    if base is not None:
        v0.sub_(base)
        v1.sub_(base)
    nuslerp(t, v0, v1, dim)
    return v0.add_(base) if base is not None else v0
