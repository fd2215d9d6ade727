"""Multi-SLERP: barycentric interpolation of several models on a hypersphere.

The points are the models, or their task vectors ``x_i = theta_i - base`` when a base is
given. As mergekit 0.1.5 computes it: project them on the unit sphere,
``u_i = x_i / (|x_i| + eps)``; take the normalised weighted mean ``m = sum_i w_i u_i`` as
the point of tangency; map the weighted tangent vectors
``v = sum_i w_i (u_i - <u_i, m/|m|> m/|m|)`` back with the exponential map,
``cos(|v| + eps) m/|m| + sin(|v| + eps) v / (|v| + eps)``, and scale the result to the
weighted mean norm ``sum_i w_i |x_i|`` (the base added back).

Every vector in this is a linear combination of the ``x_i``, so the result is
``sum_i c_i x_i`` with coefficients computed from the Gram matrix of the ``x_i`` alone
(``_gram.py``): the method streams in chunks. When ``|m| < eps`` (zero task vectors,
antipodal points whose weights cancel) the result is the weighted sum ``sum_i w_i x_i``:
mergekit's rule for two models, which mergekit refuses with three or more.
"""

from __future__ import annotations

import math

import numpy as np

from model_glue.merge.methods._common import WEIGHT, task_vectors_
from model_glue.merge.methods._gram import combine_, gram_entries, gram_matrix, norm
from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method


def multislerp_coefficients(g: np.ndarray, weights, normalize: bool, eps: float) -> np.ndarray:
    """The ``c_i`` of the result ``sum_i c_i x_i`` from the Gram matrix ``g`` of the x_i."""
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    a = w / (norms + eps)  # m = sum_i a_i x_i
    mean_norm = norm(a, g)
    if mean_norm < eps:
        return w
    mean = a / mean_norm
    dots = (g @ mean) / (norms + eps)  # <u_i, m/|m|>
    tangent = a - (w @ dots) * mean
    tangent_norm = norm(tangent, g) + eps
    unit = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return unit * float(w @ norms)


def _points(base, models):
    return task_vectors_(base, models) if base is not None else models


def _gram(base, models, params, ctx) -> list[float] | None:
    """``reduce``: one chunk's Gram entries (none needed for a single model)."""
    if len(models) == 1:
        return None
    return gram_entries(_points(base, models))


@merge_method(
    "multislerp",
    params=(
        WEIGHT,
        Param(
            "normalize_weights",
            bool,
            per_model=False,
            default=True,
            help="divide the weights by their sum",
        ),
        Param(
            "eps",
            float,
            per_model=False,
            default=1e-8,
            help="added to norms before dividing by them",
            minimum=0.0,
        ),
    ),
    base="optional",
    summary="spherical weighted mean of the models (or of their task vectors) on the hypersphere",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    chunked=True,
    reduce=_gram,
)
def multislerp_merge(base, models, params, ctx):
    if len(models) == 1:
        return models[0]  # mergekit returns the model itself, with or without a base
    weights = params["weight"]
    if params["normalize_weights"] and sum(weights) == 0:
        raise ValueError(
            f"multislerp of {ctx.tensor_name!r}: the weights sum to 0, cannot normalize"
        )
    points = _points(base, models)
    g = gram_matrix(points, ctx.totals)
    coefs = multislerp_coefficients(g, weights, params["normalize_weights"], params["eps"])
    out = combine_(points, coefs)
    return out.add_(base) if base is not None else out
