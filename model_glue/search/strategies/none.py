"""No search: every member of a cluster is merged with the configured parameters."""

from typing import Literal

from model_glue.search.strategies._base import STRATEGIES, SearchStrategy, StrategySettings


class NoSearchSettings(StrategySettings):
    strategy: Literal["none"]


STRATEGIES.register(
    SearchStrategy("none", doc="merge every member of a cluster", settings=NoSearchSettings)
)
