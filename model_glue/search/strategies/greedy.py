"""The paper's heuristic strategies: add the cluster's models one at a time, in an order,
keeping one only if the merge does not drop on the proxy (``average``: equal weights;
``coefficient``: a grid of weights for the newcomer; ``similarity``: the most similar
model first, weighted by similarity)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from model_glue.search.strategies._base import STRATEGIES, SearchStrategy, StrategySettings

if TYPE_CHECKING:
    from model_glue.search.proxy import ProxyScorer
    from model_glue.search.records import SearchResult


class GreedySettings(StrategySettings):
    grid: list[float] = Field(
        default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], min_length=1
    )  # the newcomer's weights tried (coefficient)
    # a candidate must raise the proxy by this much (paper: 0)
    min_gain: float = Field(default=0.0, ge=0.0)


class AverageSettings(GreedySettings):
    strategy: Literal["average"]


class CoefficientSettings(GreedySettings):
    strategy: Literal["coefficient"]


class SimilaritySettings(GreedySettings):
    strategy: Literal["similarity"]


def _greedy(
    names: Sequence[str], scorer: ProxyScorer, method: str, s: GreedySettings
) -> SearchResult:
    from model_glue.search.greedy import greedy_selective_merge

    return greedy_selective_merge(
        names,
        None,
        scorer,
        strategy=s.strategy,  # type: ignore[arg-type]
        method=method,
        grid=s.grid,
        similarity=scorer.similarity if s.strategy == "similarity" else None,
        min_gain=s.min_gain,
    )


for _settings, _doc in (
    (AverageSettings, "greedy, equal weights (Model-GLUE heuristic, average)"),
    (CoefficientSettings, "greedy, the newcomer's weight from a grid (heuristic, coefficient)"),
    (SimilaritySettings, "greedy, most similar first, similarity weights (heuristic, similarity)"),
):
    STRATEGIES.register(
        SearchStrategy(
            _settings.model_fields["strategy"].annotation.__args__[0],  # type: ignore[union-attr]
            doc=_doc,
            settings=_settings,
            search=_greedy,
        )
    )
