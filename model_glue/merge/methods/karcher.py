"""Karcher mean: the Riemannian centre of mass of the models on the unit hypersphere.

As mergekit 0.1.5 computes it, with equal weights ``1/N``: the unit vectors of the
models whose norm exceeds ``tol`` start from their normalised mean (the first of them
when that mean is shorter than ``tol``); each iteration moves the mean along
``sum_i alpha_i theta_i / sin(theta_i) (u_i - cos(theta_i) mean)`` (points closer than
``tol`` skipped) by the exponential map and renormalises, until that step is shorter
than ``tol`` or after ``max_iter`` steps; the result is the mean scaled by the average
norm of all the models. No model has a norm above ``tol``: zeros.

The mean stays a linear combination of the models, so every angle and norm comes from
their Gram matrix (``_gram.py``): the iterations run on N coefficients instead of on
the tensors, and the method streams in chunks.
"""

from __future__ import annotations

import math

import numpy as np

from model_glue.merge.methods._gram import combine_, gram_entries, gram_matrix, norm
from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method


def karcher_coefficients(g: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """The ``c_i`` of the Karcher mean ``sum_i c_i x_i``, from the Gram matrix ``g``."""
    k = len(g)
    alphas = np.full(k, 1.0 / k)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return np.zeros(k)
    weights = alphas[valid] / alphas[valid].sum()
    units = np.eye(k)[valid] / norms[valid, None]  # row j: u_j in coefficients of the x_i
    mean = weights @ units
    mean_norm = norm(mean, g)
    mean = units[0].copy() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = np.zeros(k)
        for alpha, unit in zip(weights, units, strict=True):
            dot = min(1.0, max(-1.0, float(mean @ g @ unit)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (unit - dot * mean)
        tangent_norm = norm(tangent, g)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(mean, g)
        if unit_norm > tol:
            mean = mean / unit_norm
    return mean * float(alphas @ norms)


def _gram(base, models, params, ctx) -> list[float] | None:
    """``reduce``: one chunk's Gram entries (none needed for a single model)."""
    return gram_entries(models) if len(models) > 1 else None


@merge_method(
    "karcher",
    params=(
        Param(
            "max_iter",
            int,
            per_model=False,
            default=10,
            help="most steps of the mean's iteration",
            minimum=0,
        ),
        Param(
            "tol",
            float,
            per_model=False,
            default=1e-5,
            help="step length (and angle, and norm) below which the iteration stops",
            minimum=0.0,
        ),
    ),
    base="none",
    summary="Riemannian (Karcher) mean of the models on the hypersphere, scaled to their mean norm",
    reference="https://arxiv.org/abs/2603.04972",
    chunked=True,
    reduce=_gram,
)
def karcher_merge(base, models, params, ctx):
    if len(models) == 1:
        return models[0]
    g = gram_matrix(models, ctx.totals)
    return combine_(models, karcher_coefficients(g, params["max_iter"], params["tol"]))
