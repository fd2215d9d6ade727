"""The paper's greedy selective merge (Model-GLUE, section 3.2, "Heuristic" strategies).

Members of a cluster are visited best proxy score first. The merge starts as the best single
model; each next candidate is merged into it with a coefficient ``c`` on the current merge
and ``1 - c`` on the candidate, and is kept only if the proxy score does not drop below the
best so far. A rejected candidate is dropped for good, which is what keeps a detrimental
model from dragging the merge down.

Because merging ``(current, candidate)`` with ``(c, 1 - c)`` composes, every trial is one
:class:`TrialSpec` over the original models: the accepted weights scaled by ``c`` plus the
candidate at ``1 - c``. For linear merging this is exactly the reference's pairwise merge;
for other methods it is a one-shot merge of the accepted set with those weights, which avoids
re-trimming an already trimmed merge.

Three heuristics differ in the order of candidates and the coefficients tried:

- ``"average"``: ``c = k / (k + 1)`` with ``k`` models accepted, a running uniform average;
- ``"coefficient"``: ``c`` over a grid (0.1 ... 0.9), the best grid point is kept;
- ``"similarity"``: the grid, but the next candidate is the remaining model most similar to
  the current merge (re-ranked after every acceptance).

Unlike the reference code, round one merges the best model with the *second* one (never with
itself), the similarity order is actually built, and an accepted merge keeps the coefficient
that scored best, not the last one of the grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from model_glue.search.records import ScoreFn, SearchResult, TrialLog, TrialSpec

Strategy = Literal["average", "coefficient", "similarity"]
STRATEGIES: tuple[str, ...] = ("average", "coefficient", "similarity")
DEFAULT_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# similarity(current accepted weights, candidate name) -> similarity of the current merge and
# the candidate (higher = more similar).
SimilarityFn = Callable[[Mapping[str, float], str], float]


def greedy_selective_merge(
    candidates: Sequence[str],
    single_scores: Mapping[str, float] | None,
    merge_and_score: ScoreFn,
    *,
    strategy: Strategy = "coefficient",
    method: str = "linear",
    grid: Sequence[float] = DEFAULT_GRID,
    similarity: SimilarityFn | None = None,
    densities: Mapping[str, float] | None = None,
    min_gain: float = 0.0,
) -> SearchResult:
    """Greedily build a merge of ``candidates``, keeping a model only if it does not hurt.

    ``single_scores`` are the proxy scores of the models alone; pass ``None`` to have them
    computed through ``merge_and_score`` (a one-model merge is the model itself) and logged
    as trials. Ties in score are broken by name so the result does not depend on the order
    of ``candidates``. ``similarity`` is required by the ``"similarity"`` strategy.

    ``min_gain``: a candidate is kept when its best merge scores at least the best so far
    plus ``min_gain``. The paper's rule is 0 ("does not drop"); with a small, noisy proxy a
    tie is no evidence that the candidate helps, and a positive value (about one document's
    worth of score) rejects such models.
    """
    names = _check_candidates(candidates)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown greedy strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "similarity" and similarity is None:
        raise ValueError(
            "strategy 'similarity' needs a similarity(current_weights, candidate) function"
        )
    coefficients = _check_grid(grid)
    if not min_gain >= 0.0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    log = TrialLog(merge_and_score, f"greedy-{strategy}")
    scores = _single_scores(names, single_scores, log, method)

    order = sorted(names, key=lambda n: (-scores[n], n))
    current: dict[str, float] = {order[0]: 1.0}
    best = scores[order[0]]
    remaining = order[1:]
    rejected: dict[str, str] = {}

    while remaining:
        candidate = (
            _most_similar(current, remaining, similarity, scores)
            if strategy == "similarity"
            else remaining[0]
        )
        remaining.remove(candidate)
        if strategy == "average":
            k = len(current)
            round_coefficients: Sequence[float] = (k / (k + 1),)
        else:
            round_coefficients = coefficients

        tried: list[tuple[int, float, dict[str, float], float]] = []
        for c in round_coefficients:
            weights = {n: c * w for n, w in current.items()} | {candidate: 1.0 - c}
            spec = TrialSpec(weights, method, _subset(densities, weights))
            index, value = log.score(spec)
            tried.append((index, value, weights, c))
        # First maximum in grid order: deterministic, and the *best* coefficient is kept.
        top_index, top_value, top_weights, top_c = max(tried, key=lambda t: t[1])

        if top_value >= best + min_gain:
            reason = (
                f"kept {candidate} at c={top_c:g}: proxy {top_value:.4f} >= best so far {best:.4f}"
            )
            if min_gain:
                reason += f" + min_gain {min_gain:g}"
            current, best = top_weights, top_value
            log.settle(top_index, accepted=True, reason=reason)
        else:
            rejected[candidate] = (
                f"merging it gave a proxy score of at most {top_value:.4f} "
                f"(best c={top_c:g}), below {best:.4f}"
                + (f" + min_gain {min_gain:g}" if min_gain else "")
            )
            log.settle(
                top_index, accepted=False, reason=f"rejected {candidate}: " + rejected[candidate]
            )
        for index, value, _, c in tried:
            if index != top_index:
                log.settle(
                    index,
                    accepted=False,
                    reason=f"c={c:g} scored {value:.4f}, not the best of the round",
                )

    spec = TrialSpec(current, method, _subset(densities, current))
    return SearchResult(
        strategy=f"greedy-{strategy}",
        spec=spec,
        best_score=best,
        accepted=list(current),
        rejected=rejected,
        trials=log.trials,
    )


def _check_candidates(candidates: Sequence[str]) -> list[str]:
    names = list(candidates)
    if not names:
        raise ValueError("greedy selective merge needs at least one candidate model")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"candidate models listed twice: {duplicates}")
    return names


def _check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(c) for c in grid)
    if not values or any(not 0.0 < c < 1.0 for c in values):
        raise ValueError(f"coefficient grid must be non-empty with values in (0, 1), got {values}")
    return values


def _single_scores(
    names: list[str], given: Mapping[str, float] | None, log: TrialLog, method: str
) -> dict[str, float]:
    if given is not None:
        missing = [n for n in names if n not in given]
        if missing:
            raise ValueError(f"single_scores lacks the proxy score of candidate(s) {missing}")
        return {n: float(given[n]) for n in names}
    scores = {}
    for n in sorted(names):
        index, scores[n] = log.score(TrialSpec({n: 1.0}, "linear"))
        log.settle(index, accepted=False, reason=f"proxy score of {n} alone")
    return scores


def _most_similar(
    current: Mapping[str, float],
    remaining: list[str],
    similarity: SimilarityFn | None,
    scores: Mapping[str, float],
) -> str:
    assert similarity is not None
    # Most similar first; equal similarity falls back to the proxy-score order, then the name.
    return min(remaining, key=lambda n: (-float(similarity(current, n)), -scores[n], n))


def _subset(
    densities: Mapping[str, float] | None, weights: Mapping[str, float]
) -> dict[str, float] | None:
    if densities is None:
        return None
    return {n: densities[n] for n in weights if n in densities}
