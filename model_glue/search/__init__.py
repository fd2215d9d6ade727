"""Selective merging inside a cluster (Model-GLUE, section 3.2).

Strategies decide which models of a cluster to merge and with which coefficients; they are
generic over a scoring function ``merge_and_score(TrialSpec) -> proxy score`` so they can be
tested with synthetic scores. :class:`ProxyScorer` is the concrete scoring function: it
merges resident state dicts in memory into one reusable model and scores it with lm-eval on
the proxy tasks with a ``limit``; no checkpoint is written per trial.
"""

import importlib

# name -> module, imported on first use: the run configuration reads the strategies'
# declarations (model_glue.search.strategies) without CMA-ES, numpy or torch
_LAZY = {
    "engine_model_params": "engine_params",
    "evolutionary_search": "evolutionary",
    "DEFAULT_GRID": "greedy",
    "greedy_selective_merge": "greedy",
    "layer_group_of": "layer_groups",
    "ScoreFn": "records",
    "SearchResult": "records",
    "Trial": "records",
    "TrialSpec": "records",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_GRID",
    "TrialSpec",
    "ScoreFn",
    "SearchResult",
    "Trial",
    "engine_model_params",
    "evolutionary_search",
    "greedy_selective_merge",
    "layer_group_of",
]
