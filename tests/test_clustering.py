"""``similarity.threshold: auto``: the widest gap, on zoos the paper's 0.95 gets wrong."""

from __future__ import annotations

import pytest

from model_glue.clustering import auto_threshold, cluster_models


def _cluster(values: dict[tuple[str, str], float], threshold) -> list[tuple[str, ...]]:
    names = sorted({n for pair in values for n in pair})
    sim = {tuple(sorted(p)): v for p, v in values.items()}
    clusters = cluster_models(
        dict.fromkeys(names, "llama"), lambda a, b: sim[tuple(sorted((a, b)))], threshold
    )
    return sorted(c.members for c in clusters)


def _pairs(names: list[str], value) -> dict[tuple[str, str], float]:
    return {(a, b): value(a, b) for i, a in enumerate(names) for b in names[i + 1 :]}


def test_fine_tunes_just_below_the_papers_threshold_stay_one_family():
    # five fine-tunes of one base at 0.931..0.949 among themselves (the zoo had
    # 0.951 as its lowest value and 0.95 split it into four clusters), another family at 0
    family = ["ft1", "ft2", "ft3", "ft4", "ft5"]
    within = iter([0.931, 0.935, 0.938, 0.94, 0.941, 0.943, 0.944, 0.946, 0.948, 0.949])
    values = _pairs(family, lambda a, b: next(within))
    values |= {(f, "other"): 0.01 for f in family}
    choice = auto_threshold(values.values())
    assert choice.rule == "widest-gap"
    assert (choice.gap_low, choice.gap_high) == (0.01, 0.931)
    assert choice.threshold == pytest.approx((0.01 + 0.931) / 2)
    assert _cluster(values, choice.threshold) == [tuple(family), ("other",)]
    assert len(_cluster(values, 0.95)) == 6  # what the fixed threshold does: all apart


def test_unrelated_models_each_stay_alone():
    names = ["a", "b", "c", "d"]
    spread = iter([-0.02, 0.0, 0.01, 0.015, 0.03, 0.04])
    values = _pairs(names, lambda a, b: next(spread))
    choice = auto_threshold(values.values())
    assert choice.gap_low == 0.04 and choice.gap_high == 1.0  # the gap up to "identical"
    assert _cluster(values, choice.threshold) == [("a",), ("b",), ("c",), ("d",)]


def test_one_family_only_joins_through_the_gap_down_to_zero():
    names = ["b", "f1", "f2"]
    values = {("b", "f1"): 0.99, ("b", "f2"): 0.985, ("f1", "f2"): 0.97}
    choice = auto_threshold(values.values())
    assert (choice.gap_low, choice.gap_high) == (0.0, 0.97)
    assert _cluster(values, choice.threshold) == [tuple(names)]


def test_declared_relations_keep_their_pairs_together():
    # a heavily trained fine-tune (0.4 to its base) of family x, and family y at 0.95+:
    # without evidence the widest gap (0.4..0.95) cuts x's pair; declared, it must join
    values = {
        ("x", "x-heavy"): 0.4,
        ("y1", "y2"): 0.97,
        ("y1", "y3"): 0.96,
        ("y2", "y3"): 0.95,
    } | {(a, b): 0.0 for a in ("x", "x-heavy") for b in ("y1", "y2", "y3")}
    blind = auto_threshold(values.values())
    assert (blind.gap_low, blind.gap_high) == (0.4, 0.95)
    assert ("x",) in _cluster(values, blind.threshold)
    told = auto_threshold(values.values(), must_join=[0.4])
    assert (told.gap_low, told.gap_high) == (0.0, 0.4)
    assert _cluster(values, told.threshold) == [("x", "x-heavy"), ("y1", "y2", "y3")]


def test_edge_cases():
    assert auto_threshold([]).rule == "single-model"
    two = auto_threshold([0.8])
    assert (two.gap_low, two.gap_high) == (0.0, 0.8)  # a pair joins above 0.5
    assert auto_threshold([0.3]).gap_low == 0.3  # and stays apart below it
    tie = auto_threshold([0.5])  # equal gaps: the stricter threshold
    assert tie.threshold == 0.75
    assert auto_threshold([1.2, -0.4]).values == (0.0, 1.0)  # clipped
    nan = float("nan")
    assert auto_threshold([0.9, nan]).values == (0.9,)  # NaN says nothing about the gap
    values = {("a", "b"): 0.99, ("a", "c"): nan, ("b", "c"): 0.98}
    assert _cluster(values, 0.5) == [("a", "b"), ("c",)]  # and never links


def test_per_architecture_thresholds():
    sims = {("a1", "a2"): 0.6, ("b1", "b2"): 0.6}
    arch = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}
    clusters = cluster_models(arch, lambda a, b: sims[(a, b)], {"A": 0.5, "B": 0.7})
    assert sorted(c.members for c in clusters) == [("a1", "a2"), ("b1",), ("b2",)]


def _reference_complete_linkage(keys, sim, cut):
    """The previous pure-Python clustering (O(N^4)), the reference for cluster_matrix."""
    import math

    def s(a, b):
        return sim[(a, b) if a < b else (b, a)]

    groups = [[k] for k in keys]
    while True:
        best = None
        for i, gi in enumerate(groups):
            for gj in groups[i + 1 :]:
                pairs = [s(a, b) for a in gi for b in gj]
                link = math.nan if any(map(math.isnan, pairs)) else min(pairs)
                if not link >= cut:
                    continue
                cand = (link, tuple(gi), tuple(gj))
                if best is None or (-cand[0], cand[1], cand[2]) < (-best[0], best[1], best[2]):
                    best = cand
        if best is None:
            break
        _, gi, gj = best
        groups = [g for g in groups if tuple(g) not in (gi, gj)] + [sorted(gi + gj)]
        groups.sort()
    out = []
    for g in groups:
        internal = [s(a, b) for i, a in enumerate(g) for b in g[i + 1 :]]
        out.append((tuple(g), min(internal) if internal else None))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_cluster_matrix_gives_the_reference_clusters_ties_and_nan_included(seed):
    import numpy as np

    from model_glue.clustering import cluster_matrix

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 14))
    keys = sorted(f"m{i:02d}" for i in rng.permutation(40)[:n])
    # few distinct values: many ties; some NaN
    values = rng.choice([0.2, 0.5, 0.7, 0.7, 0.9, 0.9, 0.95, float("nan")], size=(n, n))
    matrix = np.triu(values, 1)
    matrix = matrix + matrix.T
    sim = {
        (a, b): float(matrix[i, j]) for i, a in enumerate(keys) for j, b in enumerate(keys) if a < b
    }
    for cut in (0.5, 0.7, 0.9):
        assert cluster_matrix(keys, matrix, cut) == _reference_complete_linkage(keys, sim, cut)
