"""Model Breadcrumbs (Davari & Belilovsky 2023): drop outliers and small entries, then add.

``breadcrumbs`` adds the masked task vectors (task arithmetic); ``breadcrumbs_ties``
combines them with the TIES sign election.
"""

from __future__ import annotations

from model_glue.merge.methods._common import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    normalize,
    sign_consensus_merge,
    task_vectors_,
    weighted_sum_merge,
)
from model_glue.merge.params import Param
from model_glue.merge.registry import merge_method
from model_glue.merge.sparsify import breadcrumbs_prune_

GAMMA = Param(
    "gamma",
    float,
    per_model=True,
    default=0.01,
    help="fraction of largest-magnitude entries dropped as outliers",
    minimum=0.0,
    maximum=1.0,
)


def _prune(taus, params):
    for tau, density, gamma in zip(taus, params["density"], params["gamma"], strict=True):
        breadcrumbs_prune_(tau, density, gamma)


@merge_method(
    "breadcrumbs",
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, normalize(False)),
    base="required",
    summary="drop the largest (gamma) and smallest task-vector entries, keep density, add to the base",
    reference="https://arxiv.org/abs/2312.06795",
)
def breadcrumbs_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    _prune(taus, params)
    return weighted_sum_merge(base, taus, params["weight"], params["lambda"], params["normalize"])


@merge_method(
    "breadcrumbs_ties",
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, normalize(True)),
    base="required",
    summary="breadcrumbs masks combined with the TIES sign election",
    reference="https://arxiv.org/abs/2312.06795",
)
def breadcrumbs_ties_merge(base, models, params, ctx):
    taus = task_vectors_(base, models)
    _prune(taus, params)
    return sign_consensus_merge(base, taus, params["weight"], params["lambda"], params["normalize"])
