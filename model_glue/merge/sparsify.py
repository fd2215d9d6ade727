"""Sparsification of task vectors: magnitude top-k, breadcrumbs band, seeded random drop.

Why not sort: mergekit argsorts every task vector to find its top-k, an O(n log n) pass
that dominates a TIES merge. Here the k-th largest magnitude is found in linear time by
introselect, and the trimming itself is a branch-free threshold.

Ties: selections are exact. Among equal magnitudes at the threshold, lower flat indices
win, so "the top k" is one well-defined set (mergekit breaks such ties arbitrarily; in
bfloat16 they are common).

Random drop (DARE): the keep/drop decision of element ``i`` is the ``i``-th draw of a
PCG64 stream seeded from (seed, tensor name, model name). A result therefore depends on
neither processing order nor thread count. Draws are 16-bit, so the effective keep
probability is ``round(density * 65536) / 65536``; rescaling uses that exact value.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def kth_largest(magnitude: torch.Tensor, k: int) -> tuple[float, int, int]:
    """The k-th largest value v of a flat float tensor (1 <= k <= n), with the number of
    elements greater than v and equal to v.

    numpy's introselect (``np.partition``) runs in linear time and measured over ten
    times faster than ``torch.kthvalue`` on CPU; it works on a copy.
    """
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} elements")
    i = n - k
    part = np.partition(magnitude.numpy(), i)
    value = part[i]
    upper = part[i + 1 :]  # every element here is >= value
    n_greater = int(np.count_nonzero(upper > value))
    n_equal = 1 + (len(upper) - n_greater) + int(np.count_nonzero(part[:i] == value))
    return float(value), n_greater, n_equal


def _nth_equal_position(magnitude: torch.Tensor, value: float, nth: int) -> int:
    """Smallest ``cut`` such that ``magnitude[:cut]`` holds ``nth`` entries equal to value."""
    positions = np.flatnonzero(magnitude.numpy() == np.float32(value))
    return int(positions[nth - 1]) + 1


def _keep_top_k_(magnitude: torch.Tensor, k: int) -> None:
    """Zero all but exactly the k largest entries of a flat non-negative tensor, in place.

    Arithmetic (``threshold_``) instead of boolean masks: a data-dependent mask costs
    ten times more per element on a CPU than a branch-free threshold.
    """
    n = magnitude.numel()
    if k >= n:
        return
    if k <= 0:
        magnitude.zero_()
        return
    value, n_greater, n_equal = kth_largest(magnitude, k)
    below = float(
        torch.nextafter(
            torch.tensor(value, dtype=magnitude.dtype), torch.tensor(-1.0, dtype=magnitude.dtype)
        )
    )
    torch.threshold_(magnitude, below, 0.0)  # keeps magnitude >= value
    need = k - n_greater
    if value > 0 and need < n_equal:
        cut = _nth_equal_position(magnitude, value, need)
        torch.threshold_(magnitude[cut:], value, 0.0)  # later ties: keep only > value


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries of a flat tensor (ties: lower index)."""
    n = magnitude.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    value, n_greater, n_equal = kth_largest(magnitude, k)
    mask = magnitude > value
    need = k - n_greater
    equal = magnitude == value
    cut = n if need == n_equal else _nth_equal_position(magnitude, value, need)
    mask[:cut].logical_or_(equal[:cut])
    return mask


def magnitude_prune_(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming in place: keep the ``max(1, int(density * n))`` largest |tau|."""
    if density >= 1:
        return tau
    flat = tau.view(-1)
    if density <= 0 or flat.numel() == 0:
        return tau.zero_()
    magnitude = flat.abs()
    _keep_top_k_(magnitude, max(1, int(density * flat.numel())))
    torch.copysign(magnitude, flat, out=flat)
    return tau


def breadcrumbs_prune_(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs in place: drop the ``gamma`` largest outliers and the smallest.

    Keeps ``int(density * n)`` entries, ranks ``[n_bot, n_bot + kept)`` by ascending
    magnitude with ``n_bot = max(0, n - kept - int(gamma * n))`` (mergekit's rule: the
    outlier cut shrinks when needed to keep the density).
    """
    if density >= 1:
        return tau
    flat = tau.view(-1)
    n = flat.numel()
    if n == 0:
        return tau
    kept = int(density * n)
    n_bot = max(0, n - kept - int(gamma * n))
    magnitude = flat.abs()
    keep = top_k_mask(magnitude, n - n_bot)
    keep.logical_and_(top_k_mask(magnitude, n - n_bot - kept).logical_not_())
    flat.mul_(keep.to(flat.dtype))
    return tau


def mask_seed(seed: int, tensor_name: str, model_name: str) -> int:
    """A 128-bit seed for one (tensor, model) pair, stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_name}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def random_drop_(tau: torch.Tensor, density: float, seed: int) -> float:
    """DARE drop in place: keep each entry with probability ~density; return that probability."""
    threshold = round(density * 65536)
    if threshold >= 65536:
        return 1.0
    flat = tau.view(-1)
    if threshold <= 0:
        flat.zero_()
        return 0.0
    n = flat.numel()
    raw = np.random.PCG64(seed).random_raw(-(-n // 4))
    keep = raw.astype("<u8", copy=False).view("<u2")[:n] < threshold
    values = flat.numpy()
    np.multiply(values, keep, out=values)  # numpy: torch's masked ops are slow on random masks
    return threshold / 65536
