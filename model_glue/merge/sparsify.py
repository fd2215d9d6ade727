"""Sparsification of task vectors: magnitude top-k, breadcrumbs band, seeded random drop
(DARE's uniform one and DELLA's magnitude-ranked one).

Why not sort: mergekit argsorts every task vector to find its top-k, an O(n log n) pass
that dominates a TIES merge. Here the k-th largest magnitude is found in linear time by
introselect, and the trimming itself is a branch-free threshold.

Ties: selections are exact. Among equal magnitudes at the threshold, lower flat indices
win, so "the top k" is one well-defined set (mergekit breaks such ties arbitrarily; in
bfloat16 they are common).

Random drop (DARE): the keep/drop decision of element ``i`` is the ``i``-th draw of a
PCG64 stream seeded from (seed, tensor name, model name). A result therefore depends on
neither processing order nor thread count, nor on whether the tensor is processed whole
or in chunks (the stream is advanced to a chunk's offset). Draws are 16-bit, so the
effective keep probability is ``round(density * 65536) / 65536``; rescaling uses that
exact value. DELLA (:func:`magprune_`) draws from the same streams, each element against
its own rank-dependent threshold.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from model_glue.merge.registry import CHUNK


def kth_largest(magnitude: torch.Tensor, k: int) -> tuple[float, int, int]:
    """The k-th largest value v of a flat non-negative float tensor (1 <= k <= n), with
    the number of elements greater than v and equal to v.

    numpy's introselect (``np.partition``) runs in linear time and measured over ten
    times faster than ``torch.kthvalue`` on CPU; it works on a copy. It degrades when most
    values are one value: over 16M magnitudes, 0.04 s when they are distinct, 0.4-1.1 s when
    70% are exact zeros, which real task vectors often are (frozen tensors, partial
    fine-tunes). So when a strided sample holds zeros, they are counted (one pass): when
    the k-th largest is zero nothing is selected at all, and when over a quarter are zeros
    only the rest is searched. Values that repeat heavily without being zero (small bf16
    updates) measured no slower than distinct ones. The triple is the same either way.
    """
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} elements")
    values = magnitude.numpy()
    sample = values[:: max(1, n // _SAMPLE)][:_SAMPLE]
    if np.count_nonzero(sample) < len(sample) - len(sample) // 8:  # zeros likely: count them
        nonzero = int(np.count_nonzero(values))
        if k > nonzero:  # the k-th largest is a zero
            return 0.0, nonzero, n - nonzero
        if nonzero < n - n // 4:  # zero-heavy: select among the rest (a copy of them)
            values = values[values != 0]
    i = len(values) - k
    part = np.partition(values, i)
    value = part[i]
    upper = part[i + 1 :]  # every element here is >= value
    n_greater = int(np.count_nonzero(upper > value))
    n_equal = 1 + (len(upper) - n_greater) + int(np.count_nonzero(part[:i] == value))
    return float(value), n_greater, n_equal


_SAMPLE = 1024  # values sampled to guess whether counting zeros pays


def _nth_equal_position(magnitude: torch.Tensor, value: float, nth: int) -> int:
    """Smallest ``cut`` such that ``magnitude[:cut]`` holds ``nth`` entries equal to value
    (scanned block by block: it stops at the block that holds the nth, and allocates one
    block's positions, not every equal entry's)."""
    values, v = magnitude.numpy(), np.float32(value)
    seen = 0
    for a in range(0, len(values), _EQUAL_BLOCK):
        block = values[a : a + _EQUAL_BLOCK] == v
        here = int(np.count_nonzero(block))
        if seen + here >= nth:
            return a + int(np.flatnonzero(block)[nth - seen - 1]) + 1
        seen += here
    raise ValueError(f"fewer than {nth} entries equal {value}")


_EQUAL_BLOCK = 1 << 18


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


class RandomKeep:
    """The keep/drop draws of one (tensor, model): draw ``i`` decides element ``i``.

    Element ``i`` is kept when the ``i``-th 16-bit draw of a PCG64 stream is below
    ``round(density * 65536)``. Draws are made in blocks; consecutive blocks continue the
    stream, any other position is reached with ``advance`` (cheap), so a tensor split into
    chunks gets exactly the masks it gets whole.
    """

    def __init__(self, density: float, seed: int) -> None:
        self.threshold = min(65536, max(0, round(density * 65536)))
        self.p = self.threshold / 65536  # the exact keep probability
        self._seed = seed
        self._bitgen: np.random.PCG64 | None = None
        self._next = -1  # element the stream is positioned at

    def draw(self, offset: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """Booleans for elements ``[offset, offset + n)``; ``offset`` a multiple of 4."""
        if offset % 4:
            raise ValueError(f"offset {offset} is not a multiple of 4")
        return np.less(self.uniform16(offset, n), self.threshold, out=out)

    def uniform16(self, offset: int, n: int) -> np.ndarray:
        """The 16-bit draws of elements ``[offset, offset + n)`` (any offset)."""
        skip = offset % 4
        start = offset - skip
        if self._bitgen is None or start != self._next:
            self._bitgen = np.random.PCG64(self._seed)
            self._bitgen.advance(start // 4)
        raw = self._bitgen.random_raw(-(-(skip + n) // 4))
        self._next = offset + n if (offset + n) % 4 == 0 else -1
        return raw.view("<u2")[skip : skip + n]


@dataclass(frozen=True)
class Drop:
    """What :func:`random_drop_` did: the keep probability and, when measured, the L1
    norm of the values before and after the drop."""

    p: float
    l1_before: float = 0.0
    l1_after: float = 0.0


def random_drop_(
    tau: torch.Tensor, density: float, seed: int, *, offset: int = 0, measure_l1: bool = False
) -> Drop:
    """DARE drop in place with a fresh :class:`RandomKeep` (see :func:`drop_`)."""
    return drop_(tau, RandomKeep(density, seed), offset=offset, measure_l1=measure_l1)


def drop_(
    tau: torch.Tensor, keep: RandomKeep, *, offset: int = 0, measure_l1: bool = False
) -> Drop:
    """DARE drop in place: keep each entry with probability ``keep.p``.

    ``tau`` is the flat range ``[offset, offset + numel)`` of a tensor (``offset`` a
    multiple of 4) and ``keep`` that tensor's RandomKeep, which may be reused from chunk to
    chunk. The work runs block by block (blocks of ``CHUNK`` aligned to the whole tensor),
    in cache.

    ``measure_l1``: also sum ``|tau|`` before and after the drop, in float32 per block
    and exactly (``math.fsum``) across blocks, so the sums depend neither on how the
    tensor was split nor on thread counts.
    """
    flat = tau.view(-1)
    values = flat.numpy()
    n = flat.numel()
    if keep.threshold in (0, 65536) or n == 0:
        l1 = _l1(values, offset) if measure_l1 else 0.0
        if keep.threshold == 65536:
            return Drop(1.0, l1, l1)
        flat.zero_()
        return Drop(0.0, l1, 0.0)
    size = min(n, CHUNK)
    mask = np.empty(size, dtype=bool)
    magnitude = np.empty(size, dtype=np.float32) if measure_l1 else None
    before, after = [], []
    for a, b in blocks(n, offset):
        v = values[a:b]
        if not v.any():  # a frozen block: nothing to drop, no draws needed (same result)
            before.append(0.0)
            after.append(0.0)
            continue
        k = keep.draw(offset + a, b - a, out=mask[: b - a])
        if magnitude is not None:
            l1_before, l1_after = kept_l1(v, k, magnitude[: b - a])
            before.append(l1_before)
            after.append(l1_after)
        np.multiply(v, k, out=v)  # numpy: torch's masked ops are slow on random masks
    return Drop(keep.p, math.fsum(before), math.fsum(after))


def kept_l1(values: np.ndarray, keep: np.ndarray, scratch: np.ndarray) -> tuple[float, float]:
    """(sum |values|, sum |values| where keep), in float32 (one block)."""
    m = np.abs(values, out=scratch)
    total = float(np.add.reduce(m))
    return total, float(np.add.reduce(np.multiply(m, keep, out=m)))


def blocks(n: int, offset: int):
    """``[a, b)`` ranges of a flat range of ``n`` elements starting at ``offset``, cut at
    the multiples of ``CHUNK`` of the whole tensor."""
    a = 0
    while a < n:
        b = min(n, a + CHUNK - (offset + a) % CHUNK)
        yield a, b
        a = b


def _l1(values: np.ndarray, offset: int) -> float:
    return math.fsum(
        float(np.add.reduce(np.abs(values[a:b]))) for a, b in blocks(len(values), offset)
    )


def magprune_(
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    seed: int,
    *,
    inverse: bool = False,
    measure_l1: bool = False,
) -> Drop:
    """DELLA's MAGPRUNE in place: keep each entry with a probability that grows with its
    magnitude's rank within its row.

    Ranks run along dimension 1 (a 1-D tensor is one row; for more than two dimensions,
    as mergekit, along dimension 1 for each index of the others), ascending by magnitude
    (equal magnitudes: lower index first), and the keep probability of rank ``r`` among
    ``m`` is ``density - epsilon + 2 epsilon r / (m - 1)`` (``density`` when ``m`` is 1,
    where mergekit fails). Entry ``j`` is kept when the ``j``-th 16-bit draw of the
    :class:`RandomKeep` stream of ``seed`` is below ``round(p * 65536)``, so the result
    depends neither on threads nor on processing order. ``inverse``: divide each kept
    entry by that exact probability (the DELLA paper's rescaling). ``measure_l1``: as in
    :func:`drop_` (the same ``CHUNK``-aligned blocks). ``density >= 1`` keeps
    everything, ``density <= 0`` nothing.

    Works on blocks of whole rows (about ``_ROW_BLOCK`` elements), so the ranks and draws
    never need more than a few block-sized buffers.
    """
    flat = tau.view(-1)
    values = flat.numpy()
    n = flat.numel()
    if density >= 1 or density <= 0 or n == 0:
        l1 = _l1(values, 0) if measure_l1 else 0.0
        if density >= 1:
            return Drop(1.0, l1, l1)
        flat.zero_()
        return Drop(0.0, l1, 0.0)
    shape = tuple(tau.shape) if tau.dim() >= 2 else (1, n)
    outer, m = shape[0], shape[1]
    inner = n // (outer * m)
    rows = tau.view(outer, m, inner)
    low, step = density - epsilon, (2 * epsilon / (m - 1) if m > 1 else 0.0)
    if m == 1:
        low = density
    keep = RandomKeep(density, seed)
    per_block = max(1, _ROW_BLOCK // (m * inner))
    before = _l1(values, 0) if measure_l1 else 0.0
    for a in range(0, outer, per_block):
        b = min(outer, a + per_block)
        block = rows[a:b]
        order = torch.argsort(block.abs(), dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(m).view(1, m, 1).expand_as(order))
        del order
        threshold = torch.round((rank.double() * step + low) * 65536).clamp_(0, 65536)
        threshold = threshold.to(torch.int32).view(-1).numpy()
        del rank
        start, stop = a * m * inner, b * m * inner
        v = values[start:stop]
        kept = np.less(keep.uniform16(start, stop - start), threshold)
        if inverse:
            scale = np.divide(65536.0, threshold, where=kept, out=np.zeros(len(v)))
            np.multiply(v, scale.astype(np.float32), out=v)
        else:
            np.multiply(v, kept, out=v)
    return Drop(density, before, _l1(values, 0) if measure_l1 else 0.0)


_ROW_BLOCK = CHUNK  # elements of the row blocks magprune_ ranks and draws at once
