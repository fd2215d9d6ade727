"""Which models enter the model-level mixture: greedy expert selection on the proxy split.

Candidates are every model the recipe could route to: each cluster's merged model (or the
member that stands for it) and every zoo model, rejected by filtering or not. The score of a set of experts is the
mixture's proxy score: on each proxy document, the value (e.g. exact match) of the expert
that a router fitted on the other documents sends it to (``folds``-fold cross-validation of
the linear router, :func:`~model_glue.mixture.routers.fit_linear_router`). A model-level
mixture answers a document with its routed expert, so this is the mixture's own score on
documents its router did not see. One expert scores its own mean.

Greedy: start from the best single candidate, add the candidate that raises the score most,
stop when none raises it by more than ``min_gain`` or at ``max_experts``. Every evaluated
set is a trial, as in the merge search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model_glue.mixture.loading import MixtureError
from model_glue.mixture.routers.linear import fit_linear_router


@dataclass(frozen=True)
class SelectionTrial:
    trial: int
    experts: list[str]
    score: float
    accepted: bool
    reason: str


@dataclass
class Selection:
    selected: list[str]
    score: float
    trials: list[SelectionTrial] = field(default_factory=list)


def routed_score(
    features: torch.Tensor,
    correct: torch.Tensor,
    experts: Sequence[int],
    *,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Mean value of the routed expert over all documents, each routed by a linear router
    fitted on the other folds (restricted to ``experts``, columns of ``correct``)."""
    experts = list(experts)
    n = correct.shape[0]
    if n == 0:
        raise MixtureError("expert selection: no proxy documents")
    if len(experts) == 1:
        return float(correct[:, experts[0]].mean())
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    folds = max(2, min(folds, n))
    total = 0.0
    sub = correct[:, experts].float()
    for f in range(folds):
        held = order[f::folds]
        train = torch.cat([order[g::folds] for g in range(folds) if g != f])
        if sub[train].sum() == 0:  # nothing to learn from: the first expert answers
            picks = torch.zeros(len(held), dtype=torch.long)
        else:
            gate = fit_linear_router(features[train], sub[train])
            picks = (features[held].float() @ gate.weight.T + gate.bias).argmax(1)
        total += float(sub[held, picks].sum())
    return total / n


def greedy_select(
    features: torch.Tensor,
    correct: torch.Tensor,
    names: Sequence[str],
    *,
    max_experts: int | None = None,
    min_gain: float = 1e-9,
    folds: int = 5,
    seed: int = 0,
) -> Selection:
    """Greedy forward selection of experts by :func:`routed_score` (see the module doc)."""
    if correct.ndim != 2 or correct.shape[1] != len(names) or not len(names):
        raise MixtureError(
            f"expert selection: correctness {tuple(correct.shape)} does not match {len(names)} candidates"
        )
    limit = len(names) if max_experts is None else max(1, min(max_experts, len(names)))
    means = correct.float().mean(0)
    first = int(max(range(len(names)), key=lambda i: (float(means[i]), -i)))
    chosen, score = [first], float(means[first])
    trials = [SelectionTrial(0, [names[first]], score, True, "best single candidate")]
    while len(chosen) < limit:
        best, best_score = None, score
        for c in range(len(names)):
            if c in chosen:
                continue
            s = routed_score(features, correct, [*chosen, c], folds=folds, seed=seed)
            gain = s - score
            trials.append(
                SelectionTrial(
                    len(trials), [names[i] for i in [*chosen, c]], s, False, f"gain {gain:+.4f}"
                )
            )
            if s > best_score + min_gain:
                best, best_score = c, s
        if best is None:
            break
        chosen.append(best)
        score = best_score
        for t in reversed(trials):  # mark the winning trial of this round
            if t.experts == [names[i] for i in chosen]:
                trials[t.trial] = SelectionTrial(
                    t.trial, t.experts, t.score, True, f"added {names[best]}: {t.reason}"
                )
                break
    return Selection([names[i] for i in chosen], score, trials)
