"""Selective merging inside a cluster (Model-GLUE, section 3.2).

Strategies decide which models of a cluster to merge and with which coefficients; they are
generic over a scoring function ``merge_and_score(TrialSpec) -> proxy score`` so they can be
tested with synthetic scores. :class:`ProxyScorer` is the concrete scoring function: it
merges resident state dicts in memory into one reusable model and scores it with lm-eval on
the proxy tasks with a ``limit``; no checkpoint is written per trial.
"""

from model_glue.search.engine_params import engine_model_params
from model_glue.search.evolutionary import evolutionary_search
from model_glue.search.greedy import DEFAULT_GRID, STRATEGIES, greedy_selective_merge
from model_glue.search.layer_groups import layer_group_of
from model_glue.search.records import ScoreFn, SearchResult, Trial, TrialSpec

__all__ = [
    "DEFAULT_GRID",
    "STRATEGIES",
    "TrialSpec",
    "ScoreFn",
    "SearchResult",
    "Trial",
    "engine_model_params",
    "evolutionary_search",
    "greedy_selective_merge",
    "layer_group_of",
]
