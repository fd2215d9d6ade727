"""What a search asks for (:class:`TrialSpec`) and what it leaves behind (:class:`Trial`,
:class:`SearchResult`).

Strategies never merge or evaluate anything themselves: they hand a :class:`TrialSpec` to a
scoring function (``ScoreFn``) and read back one proxy score. This keeps them testable with
synthetic scores and lets the caller decide how merging and evaluation happen. Every call is
logged as a :class:`Trial`, a small JSON-friendly record the pipeline stores as one row of
its ``trials`` table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Per model, either one weight for every tensor or one weight per layer group: G contiguous
# groups of decoder layers, then one last entry for everything outside the decoder layers
# (embeddings, final norm, lm_head). See ``model_glue.search.layer_groups``.
Weight = float | tuple[float, ...]


@dataclass(frozen=True)
class TrialSpec:
    """One candidate merge of a cluster: which models, with which coefficients, how.

    ``weights`` are raw per-model coefficients; normalising them (or not) is the merge
    method's business, exactly as in mergekit (linear divides by their sum, task arithmetic
    does not). ``densities`` are per-model keep fractions for TIES/DARE, ``None`` to use the
    method's default.
    """

    weights: Mapping[str, Weight]
    method: str = "linear"
    densities: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("TrialSpec needs at least one model")
        lengths = {len(w) if isinstance(w, tuple) else 0 for w in self.weights.values()}
        if len(lengths) != 1:
            raise ValueError(f"TrialSpec mixes scalar and per-group weights: {dict(self.weights)}")
        for name, w in self.weights.items():
            for v in w if isinstance(w, tuple) else (w,):
                if not math.isfinite(v) or v < 0:
                    raise ValueError(
                        f"TrialSpec weight of {name!r} must be finite and >= 0, got {v}"
                    )
        if self.densities is not None:
            unknown = set(self.densities) - set(self.weights)
            if unknown:
                raise ValueError(
                    f"TrialSpec has densities for models it does not merge: {sorted(unknown)}"
                )
            for name, d in self.densities.items():
                if not 0.0 < d <= 1.0:
                    raise ValueError(f"TrialSpec density of {name!r} must be in (0, 1], got {d}")

    @property
    def models(self) -> list[str]:
        return list(self.weights)

    @property
    def layer_groups(self) -> int:
        """G, the number of decoder-layer groups (0 when weights are per model only)."""
        first = next(iter(self.weights.values()))
        return len(first) - 1 if isinstance(first, tuple) else 0

    def coefficients(self) -> dict[str, Any]:
        """JSON-ready coefficients for the trial record."""
        out: dict[str, Any] = {
            "weights": {
                n: [float(x) for x in w] if isinstance(w, tuple) else float(w)
                for n, w in self.weights.items()
            }
        }
        if self.densities is not None:
            out["densities"] = {n: float(d) for n, d in self.densities.items()}
        return out


ScoreFn = Callable[[TrialSpec], float]


@dataclass(frozen=True)
class Trial:
    """One proxy evaluation made by a search.

    ``accepted`` says whether the trial's merge became the search's current merge (greedy: the
    candidate was kept at this coefficient; evolutionary: a new best so far); ``reason`` says
    why, in words a user can read in the trials table.
    """

    trial: int
    strategy: str
    method: str
    spec: TrialSpec
    proxy_score: float
    seconds: float
    accepted: bool
    reason: str

    def record(self) -> dict[str, Any]:
        """The row for the ``trials`` table (minus ``search_id``, which the caller owns)."""
        return {
            "trial": self.trial,
            "strategy": self.strategy,
            "method": self.method,
            "coefficients": self.spec.coefficients(),
            "proxy_score": float(self.proxy_score),
            "seconds": float(self.seconds),
            "accepted": bool(self.accepted),
            "reason": self.reason,
        }


@dataclass
class SearchResult:
    """Outcome of a search over one cluster.

    ``spec`` is the merge to materialise with the engine; ``accepted`` lists the models it
    merges with a non-zero weight, ``rejected`` every other candidate with the reason.
    """

    strategy: str
    spec: TrialSpec
    best_score: float
    accepted: list[str]
    rejected: dict[str, str]
    trials: list[Trial] = field(default_factory=list)

    @property
    def weights(self) -> dict[str, Weight]:
        return dict(self.spec.weights)

    @property
    def evaluations(self) -> int:
        return len(self.trials)

    def records(self) -> list[dict[str, Any]]:
        return [t.record() for t in self.trials]


class TrialLog:
    """Calls the scoring function, times it, and keeps the trials in call order.

    Strategies decide ``accepted``/``reason`` only after comparing several trials, so a trial
    is first logged as pending and settled later with :meth:`settle`.
    """

    def __init__(self, score_fn: ScoreFn, strategy: str) -> None:
        self._score_fn = score_fn
        self.strategy = strategy
        self.trials: list[Trial] = []

    def score(self, spec: TrialSpec, reason: str = "") -> tuple[int, float]:
        start = time.perf_counter()
        value = float(self._score_fn(spec))
        seconds = time.perf_counter() - start
        if not math.isfinite(value):
            raise ValueError(f"score function returned {value} for {spec.coefficients()}")
        index = len(self.trials)
        self.trials.append(
            Trial(index, self.strategy, spec.method, spec, value, seconds, False, reason)
        )
        return index, value

    def settle(self, index: int, *, accepted: bool, reason: str) -> None:
        t = self.trials[index]
        self.trials[index] = Trial(
            t.trial, t.strategy, t.method, t.spec, t.proxy_score, t.seconds, accepted, reason
        )
