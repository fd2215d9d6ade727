"""Search strategies, one module each (see :mod:`model_glue.search.strategies._base`)."""

from model_glue.search.strategies._base import (
    STRATEGIES,
    SearchStrategy,
    StrategySettings,
)

__all__ = ["STRATEGIES", "SearchStrategy", "StrategySettings"]
