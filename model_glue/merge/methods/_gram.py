"""Inner products of a method's inputs, summed the way the chunked engine sums them.

The spherical methods that stream (``multislerp``, ``karcher``) return a linear
combination of their inputs, ``sum_i c_i x_i``, whose coefficients depend only on the
Gram matrix ``G_ij = <x_i, x_j>``. Its entries are sums, so the method's ``reduce`` gives
one chunk's entries, the engine adds them, and the method turns the totals into
coefficients on the scalars alone. Products are taken in float64 (exact for float32
inputs) and summed by NumPy (pairwise, on one thread: the same bits whatever torch's
thread count), over the same CHUNK-aligned blocks whether a tensor arrives whole or in
chunks, so both give the same coefficients bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model_glue.merge.registry import CHUNK


def gram_entries(xs: list[torch.Tensor]) -> list[float]:
    """The upper triangle of the Gram matrix of float32 tensors (of at most CHUNK
    elements), row by row: one chunk's share of the totals."""
    flat = [x.reshape(-1).numpy().astype(np.float64) for x in xs]
    scratch = np.empty_like(flat[0])
    out = []
    for i, a in enumerate(flat):
        for b in flat[i:]:
            np.multiply(a, b, out=scratch)
            out.append(float(scratch.sum()))
    return out


def gram_matrix(xs: list[torch.Tensor], totals: tuple[float, ...] | None) -> np.ndarray:
    """The Gram matrix, from the engine's ``totals`` or, for a whole tensor, summed over
    its CHUNK-aligned blocks exactly as the engine would."""
    k = len(xs)
    rows, cols = np.triu_indices(k)
    if totals is None:
        flats = [x.view(-1) for x in xs]
        n = flats[0].numel()
        parts = [
            gram_entries([f[a : min(n, a + CHUNK)] for f in flats]) for a in range(0, n, CHUNK)
        ]
        sums = [math.fsum(column) for column in zip(*parts, strict=True)]
        totals = sums or [0.0] * len(rows)  # an empty tensor has no blocks
    g = np.empty((k, k))
    g[rows, cols] = totals
    g[cols, rows] = totals
    return g


def norm(v: np.ndarray, g: np.ndarray) -> float:
    """|sum_i v_i x_i| for coefficients ``v`` (0 when rounding makes the square negative)."""
    return math.sqrt(max(float(v @ g @ v), 0.0))


def combine_(xs: list[torch.Tensor], coefs) -> torch.Tensor:
    """sum_i c_i x_i, written over ``xs[0]``."""
    out = xs[0].mul_(float(coefs[0]))
    for x, c in zip(xs[1:], coefs[1:], strict=True):
        out.add_(x, alpha=float(c))
    return out
