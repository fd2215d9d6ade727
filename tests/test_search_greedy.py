"""Greedy selective merge on synthetic proxy scores: exact accepted sets, weights and trials,
and the three defects of the reference code (each test fails on the reference behaviour)."""

from __future__ import annotations

import itertools

import pytest

from model_glue.search import DEFAULT_GRID, TrialSpec, greedy_selective_merge

GOOD = ("a", "b", "c")
SINGLE = {"a": 0.6, "b": 0.5, "c": 0.4, "noisy": 0.3}


def shares(spec: TrialSpec) -> dict[str, float]:
    total = sum(spec.weights.values())
    return {n: w / total for n, w in spec.weights.items()}


def skill_score(spec: TrialSpec) -> float:
    """Each good model adds 0.1; the noisy model costs 0.5 times its weight share."""
    s = shares(spec)
    good = sum(1 for n in s if n in GOOD and s[n] > 0)
    return 0.5 + 0.1 * good - 0.5 * s.get("noisy", 0.0)


def test_average_accepts_good_models_and_rejects_the_detrimental_one():
    result = greedy_selective_merge(list(SINGLE), SINGLE, skill_score, strategy="average")

    assert result.accepted == ["a", "b", "c"]
    assert result.weights == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert list(result.rejected) == ["noisy"]
    assert "0.6750" in result.rejected["noisy"] and "0.8000" in result.rejected["noisy"]
    assert result.best_score == pytest.approx(0.8)
    # One trial per round: c = k/(k+1) with k models accepted.
    assert [t.proxy_score for t in result.trials] == pytest.approx([0.7, 0.8, 0.675])
    assert [t.accepted for t in result.trials] == [True, True, False]
    assert result.trials[2].spec.weights == pytest.approx(
        {"a": 0.25, "b": 0.25, "c": 0.25, "noisy": 0.25}
    )
    assert all(t.strategy == "greedy-average" and t.method == "linear" for t in result.trials)


def test_coefficient_keeps_the_best_grid_point_not_the_last():
    """Reference defect: the accepted merge was saved with the last grid coefficient (0.9)."""

    def peaked(spec: TrialSpec) -> float:
        # Best when b carries 70% of the merge, i.e. c = 0.3 on the current merge (a).
        return 0.7 - abs(shares(spec).get("b", 0.0) - 0.7)

    result = greedy_selective_merge(
        ["a", "b"], {"a": 0.6, "b": 0.5}, peaked, strategy="coefficient"
    )

    assert result.accepted == ["a", "b"]
    assert result.weights == pytest.approx({"a": 0.3, "b": 0.7})
    assert result.best_score == pytest.approx(0.7)
    assert len(result.trials) == len(DEFAULT_GRID)
    assert [t.accepted for t in result.trials] == [c == 0.3 for c in DEFAULT_GRID]


def test_coefficient_grid_composes_over_rounds():
    def score(spec: TrialSpec) -> float:
        s = shares(spec)
        # Round 1 peaks at a:b = 0.58:0.42 (grid: 0.6); round 2 then peaks at c = 0.8.
        target = {"a": 0.48, "b": 0.32, "c": 0.2}
        return 1.0 - sum((s.get(n, 0.0) - v) ** 2 for n, v in target.items())

    result = greedy_selective_merge(
        ["c", "b", "a"], {"a": 0.3, "b": 0.2, "c": 0.1}, score, strategy="coefficient"
    )
    assert result.accepted == ["a", "b", "c"]
    assert result.weights == pytest.approx({"a": 0.48, "b": 0.32, "c": 0.2})
    assert len(result.trials) == 2 * len(DEFAULT_GRID)


def test_round_one_merges_best_with_second_never_with_itself():
    """Reference defect: the first round merged the best model with itself."""
    seen: list[TrialSpec] = []

    def record(spec: TrialSpec) -> float:
        seen.append(spec)
        return skill_score(spec)

    greedy_selective_merge(list(SINGLE), SINGLE, record, strategy="coefficient")
    assert set(seen[0].weights) == {"a", "b"}
    assert all(len(spec.weights) >= 2 and min(spec.weights.values()) > 0 for spec in seen)
    first_round = seen[: len(DEFAULT_GRID)]
    assert all(set(spec.weights) == {"a", "b"} for spec in first_round)


def test_similarity_order_is_built_and_reranked_after_each_acceptance():
    """Reference defect: similarity ordering crashed because its model list was never built."""
    table = {
        ("a",): {"b": 0.1, "c": 0.9, "noisy": 0.5},
        ("a", "c"): {"b": 0.8, "noisy": 0.2},
        ("a", "b", "c"): {"noisy": 0.3},
    }
    asked: list[tuple[tuple[str, ...], str]] = []

    def similarity(current, candidate):
        key = tuple(sorted(current))
        asked.append((key, candidate))
        return table[key][candidate]

    result = greedy_selective_merge(
        list(SINGLE), SINGLE, skill_score, strategy="similarity", similarity=similarity
    )
    visited = []
    for t in result.trials:
        new = [n for n in t.spec.weights if n not in visited]
        visited += [n for n in new if n not in visited]
    # a is the start; then c (0.9 to a), then b (0.8 to a+c), then noisy.
    assert visited == ["a", "c", "b", "noisy"]
    assert result.accepted == ["a", "c", "b"]
    assert list(result.rejected) == ["noisy"]
    assert ("a", "c") in {k for k, _ in asked}


def test_rejected_candidate_leaves_the_merge_and_similarity_order_unchanged():
    def score(spec: TrialSpec) -> float:
        return 0.9 if set(spec.weights) == {"a", "c"} else 0.1

    calls = []

    def similarity(current, candidate):
        calls.append(tuple(sorted(current)))
        return {"b": 0.9, "c": 0.5}[candidate]

    result = greedy_selective_merge(
        ["a", "b", "c"],
        {"a": 0.5, "b": 0.4, "c": 0.3},
        score,
        strategy="similarity",
        similarity=similarity,
        grid=(0.5,),
    )
    assert result.accepted == ["a", "c"]
    assert result.weights == pytest.approx({"a": 0.5, "c": 0.5})
    assert list(result.rejected) == ["b"]


@pytest.mark.parametrize("strategy", ["average", "coefficient"])
def test_result_does_not_depend_on_candidate_order(strategy):
    single = {"a": 0.5, "b": 0.5, "c": 0.4, "noisy": 0.5}  # ties broken by name
    results = [
        greedy_selective_merge(list(order), single, skill_score, strategy=strategy)
        for order in itertools.permutations(single)
    ]
    first = results[0]
    for r in results[1:]:
        assert r.accepted == first.accepted and r.weights == first.weights
        assert r.rejected == first.rejected
        assert [t.record() for t in r.trials] == [
            {**t.record(), "seconds": r.trials[i].seconds} for i, t in enumerate(first.trials)
        ]


def test_single_scores_computed_through_the_score_function_when_not_given():
    result = greedy_selective_merge(
        ["b", "a"],
        None,
        lambda s: {"a": 0.6, "b": 0.5}.get(s.models[0], 0) if len(s.models) == 1 else 0.61,
        strategy="average",
    )
    assert [t.spec.models for t in result.trials] == [["a"], ["b"], ["a", "b"]]
    assert result.accepted == ["a", "b"]
    assert result.evaluations == 3


def test_equal_score_is_accepted_as_not_dropping():
    result = greedy_selective_merge(
        ["a", "b"], {"a": 0.5, "b": 0.4}, lambda s: 0.5, strategy="average"
    )
    assert result.accepted == ["a", "b"]


def test_min_gain_rejects_a_candidate_that_only_ties():
    def tie(spec: TrialSpec) -> float:
        return 0.5 if "b" in spec.weights else 0.0

    kept = greedy_selective_merge(["a", "b"], {"a": 0.5, "b": 0.4}, tie, strategy="average")
    strict = greedy_selective_merge(
        ["a", "b"], {"a": 0.5, "b": 0.4}, tie, strategy="average", min_gain=0.01
    )
    assert kept.accepted == ["a", "b"]
    assert strict.accepted == ["a"] and "min_gain 0.01" in strict.rejected["b"]
    with pytest.raises(ValueError, match="min_gain"):
        greedy_selective_merge(["a", "b"], {"a": 0.5, "b": 0.4}, tie, min_gain=-1)


def test_records_are_json_ready():
    import json

    result = greedy_selective_merge(list(SINGLE), SINGLE, skill_score, strategy="average")
    rows = result.records()
    json.dumps(rows)
    assert rows[0]["coefficients"] == {"weights": {"a": 0.5, "b": 0.5}}
    assert rows[0]["trial"] == 0 and rows[0]["accepted"] is True and "kept b" in rows[0]["reason"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\['c'\]"):
        greedy_selective_merge(["a", "c"], {"a": 0.5}, skill_score)
    with pytest.raises(ValueError, match="similarity"):
        greedy_selective_merge(["a", "b"], {"a": 1, "b": 1}, skill_score, strategy="similarity")
    with pytest.raises(ValueError, match="unknown greedy strategy 'best'"):
        greedy_selective_merge(["a", "b"], {"a": 1, "b": 1}, skill_score, strategy="best")
    with pytest.raises(ValueError, match="grid"):
        greedy_selective_merge(["a", "b"], {"a": 1, "b": 1}, skill_score, grid=(0.0, 0.5))
    with pytest.raises(ValueError, match="twice"):
        greedy_selective_merge(["a", "a"], {"a": 1}, skill_score)
    with pytest.raises(ValueError, match="nan"):
        greedy_selective_merge(["a", "b"], {"a": 1, "b": 1}, lambda s: float("nan"))
