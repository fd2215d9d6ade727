"""The paper's evolutionary strategy: CMA-ES over the merge coefficients (per model, or per
model and layer group), optionally over the densities too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from model_glue.search.strategies._base import STRATEGIES, SearchStrategy, StrategySettings

if TYPE_CHECKING:
    from model_glue.search.proxy import ProxyScorer
    from model_glue.search.records import SearchResult


class EvolutionarySettings(StrategySettings):
    strategy: Literal["evolutionary"]
    budget: int = Field(default=200, gt=0)  # CMA-ES proxy evaluations
    sigma0: float = Field(default=1 / 6, gt=0)
    seed: int = 42
    layer_groups: int = Field(default=0, ge=0)  # 0: one weight per model
    search_density: bool = False  # also search per-model densities (TIES/DARE)


def _evolutionary(
    names: Sequence[str], scorer: ProxyScorer, method: str, s: EvolutionarySettings
) -> SearchResult:
    from model_glue.search.evolutionary import evolutionary_search

    return evolutionary_search(
        names,
        scorer,
        method=method,
        layer_groups=s.layer_groups,
        search_density=s.search_density,
        budget=s.budget,
        sigma0=s.sigma0,
        seed=s.seed,
    )


STRATEGIES.register(
    SearchStrategy(
        "evolutionary",
        doc="CMA-ES over merge coefficients (and densities)",
        settings=EvolutionarySettings,
        search=_evolutionary,
    )
)
