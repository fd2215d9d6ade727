"""What a search strategy declares, and the registry of strategies.

A strategy is one module of this package that registers a :class:`SearchStrategy`: its
settings (a pydantic model whose ``strategy`` field is its name; the run configuration's
``filter`` section is validated against it) and how it searches a cluster. Every strategy
scores trials on the same proxy, set by the keys of :class:`StrategySettings`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_glue.registry import Registry

if TYPE_CHECKING:
    from model_glue.search.proxy import ProxyScorer
    from model_glue.search.records import SearchResult


class StrategySettings(BaseModel):
    """The keys every strategy takes: how trials are scored on the proxy split.
    Subclasses add their own and narrow ``strategy`` to a ``Literal`` of their name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str
    proxy_tasks: list[str] | None = None  # default: the evaluation tasks
    # a preset's tasks as the proxy (model-glue-paper-tiny: tinyBenchmarks), with its metrics
    proxy_preset: str | None = None
    # the metric a proxy task is scored on, for tasks that report several: one name for
    # every task or one per task (default: evaluation.metrics, else the task's only metric;
    # a task with several and none chosen fails the search)
    proxy_metric: str | dict[str, str] | None = None
    # documents per proxy task and trial (paper: ~100)
    proxy_limit: int | None = Field(default=100, gt=0)

    @model_validator(mode="after")
    def _expand_preset(self) -> StrategySettings:
        if self.proxy_preset is None:
            return self
        from model_glue.presets import PRESETS, preset_tasks

        if self.proxy_preset not in PRESETS:
            raise ValueError(
                f"proxy_preset: unknown preset {self.proxy_preset!r} "
                f"(allowed: {', '.join(sorted(PRESETS))})"
            )
        metrics = preset_tasks(self.proxy_preset)
        chosen = self.proxy_metric if isinstance(self.proxy_metric, dict) else {}
        return self.model_copy(
            update={
                "proxy_tasks": list(dict.fromkeys([*metrics, *(self.proxy_tasks or [])])),
                "proxy_metric": self.proxy_metric
                if isinstance(self.proxy_metric, str)
                else metrics | chosen,
            }
        )

    @property
    def spec(self) -> SearchStrategy:
        return STRATEGIES[self.strategy]

    def search_settings(self) -> dict:
        """What the search itself depends on (its cache key): the strategy and its own keys."""
        common = set(StrategySettings.model_fields) - {"strategy"}
        return {k: v for k, v in self.model_dump().items() if k not in common}


Search = Callable[[Sequence[str], "ProxyScorer", str, Any], "SearchResult"]


@dataclass(frozen=True)
class SearchStrategy:
    name: str
    doc: str
    settings: type[StrategySettings]
    # (member names, scorer, merge method, settings) -> result; None: merge every member
    search: Search | None = None


STRATEGIES: Registry[SearchStrategy] = Registry("search strategy", "model_glue.search.strategies")
