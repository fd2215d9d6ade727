"""The top-k selection of TIES/breadcrumbs: zero-heavy magnitudes take the fast path and
select exactly what the plain introselect (and a stable argsort) select, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_glue.merge.sparsify import (
    _keep_top_k_,
    breadcrumbs_prune_,
    kth_largest,
    magnitude_prune_,
    top_k_mask,
)


def _reference(magnitude: torch.Tensor, k: int) -> tuple[float, int, int]:
    """The previous implementation: introselect over every value."""
    values = magnitude.numpy()
    i = len(values) - k
    part = np.partition(values, i)
    v = part[i]
    upper = part[i + 1 :]
    greater = int(np.count_nonzero(upper > v))
    return float(v), greater, 1 + (len(upper) - greater) + int(np.count_nonzero(part[:i] == v))


def _stable_top_k(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k largest, ties to the lower flat index: a stable sort by (-value, index)."""
    order = np.lexsort((np.arange(magnitude.numel()), -magnitude.numpy().astype(np.float64)))
    mask = torch.zeros(magnitude.numel(), dtype=torch.bool)
    mask[torch.from_numpy(order[:k].copy())] = True
    return mask


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(5000, generator=g).abs()
    sparse = dense * (torch.rand(5000, generator=g) < 0.3)
    tied = torch.randint(0, 4, (5000,), generator=g).float()  # zeros and three repeated values
    bf16 = torch.randn(5000, generator=g).to(torch.bfloat16).float().abs()
    return {
        "dense": dense,
        "sparse": sparse,
        "tied": tied,
        "bf16": bf16,
        "all-zero": torch.zeros(300),
        "one": torch.tensor([0.7]),
        "one-zero": torch.tensor([0.0]),
        "negative-zero": torch.tensor([-0.0, 0.0, 2.0, -0.0]).abs(),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_selection_equals_the_previous_one_exactly(case):
    x = _cases()[case]
    n = x.numel()
    for k in sorted({k for k in (1, 2, n // 10, n // 3, n // 2, n - 1, n) if 1 <= k <= n}):
        assert kth_largest(x, k) == _reference(x, k), (case, k)
        mask = top_k_mask(x, k)
        assert int(mask.sum()) == k and torch.equal(mask, _stable_top_k(x, k)), (case, k)
        kept = x.clone()
        _keep_top_k_(kept, k)
        want = torch.where(_stable_top_k(x, k), x, torch.zeros_like(x))
        assert torch.equal(kept, want), (case, k)


def test_pruning_keeps_the_same_entries_on_sparse_task_vectors():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(4096, generator=g) * (torch.rand(4096, generator=g) < 0.3)
    for density in (0.1, 0.29, 0.5, 0.9):
        got = magnitude_prune_(tau.clone(), density)
        k = max(1, int(density * tau.numel()))
        want = torch.where(_stable_top_k(tau.abs(), k), tau, torch.zeros_like(tau))
        assert torch.equal(got, want), density
    crumbs = breadcrumbs_prune_(tau.clone(), 0.2, 0.05)
    assert int((crumbs != 0).sum()) <= int(0.2 * tau.numel())


def test_dare_drop_skips_frozen_blocks_without_changing_anything():
    """Blocks of exact zeros draw no mask; the rest of the tensor gets the very draws it
    gets when every block is drawn (the stream is positioned by offset)."""
    from model_glue.merge.registry import CHUNK
    from model_glue.merge.sparsify import RandomKeep, drop_

    g = torch.Generator().manual_seed(2)
    n = 3 * CHUNK + 100
    tau = torch.randn(n, generator=g)
    tau[:CHUNK] = 0.0  # a frozen block first, then live ones
    tau[2 * CHUNK : 3 * CHUNK] = 0.0
    want = tau * torch.from_numpy(RandomKeep(0.3, 99).draw(0, n))
    got = tau.clone()
    d = drop_(got, RandomKeep(0.3, 99), measure_l1=True)
    assert torch.equal(got, want)
    assert d.l1_before == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    assert d.l1_after == pytest.approx(float(want.abs().sum()), rel=1e-5)


def test_heavily_repeated_magnitudes_select_the_same_entries():
    """Small bf16 updates: a few multiples of each binade's step, with frozen entries."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200_000, generator=g).to(torch.bfloat16)
    steps = torch.randint(1, 4, base.shape, generator=g, dtype=torch.int16)
    moved = (base.view(torch.int16) + steps).view(torch.bfloat16)
    magnitude = (moved.float() - base.float()).abs()
    magnitude[::3] = 0.0  # a third frozen: the zero-counting path
    n_live = int(torch.count_nonzero(magnitude))
    for k in (1, 17, 50_000, n_live - 1, n_live, n_live + 1, magnitude.numel()):
        assert kth_largest(magnitude, k) == _reference(magnitude, k), k
        assert torch.equal(top_k_mask(magnitude, k), _stable_top_k(magnitude, k)), k
