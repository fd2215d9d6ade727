"""The evolutionary strategy of Model-GLUE: CMA-ES over merge coefficients.

The search vector holds, for every model, one weight in [0, 1] (or one per layer group:
``G`` decoder-layer groups plus one for embeddings, final norm and lm_head, so
``d = N (G + 1)``) and, for TIES/DARE, one density per model. Fitness is the proxy score,
maximised. Defaults follow the paper: sigma0 = 1/6, about 200 evaluations, seed 42, and
CMA-ES's own population size ``4 + floor(3 ln d)``.

The first trial is the starting point itself (every coordinate at ``x0``, i.e. the uniform
merge), so "did the search improve on its start" is read off the trials.

Determinism: CMA-ES samples through a private ``numpy.random.Generator`` seeded from
``seed``; the global NumPy state is neither read nor changed. The budget is a hard cap: the
last generation is cut short rather than overrun it (its partial results still count for
the best, they are just not told to CMA-ES).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import cma
import numpy as np

from model_glue.search.records import ScoreFn, SearchResult, TrialLog, TrialSpec

DENSITY_METHODS = frozenset({"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"})


def evolutionary_search(
    candidates: Sequence[str],
    merge_and_score: ScoreFn,
    *,
    method: str = "linear",
    layer_groups: int = 0,
    search_density: bool = False,
    budget: int = 200,
    sigma0: float = 1 / 6,
    seed: int = 42,
    popsize: int | None = None,
    x0: float = 0.5,
    density_bounds: tuple[float, float] = (0.1, 1.0),
    min_share: float = 0.05,
) -> SearchResult:
    """Search per-model (and per-layer-group) weights, and densities, with CMA-ES.

    ``min_share``: a model whose share of the total weight is below it in every group of the
    best merge is reported as rejected (the search drove it out); its tiny weight stays in
    the returned spec, which is exactly what was scored.
    """
    names = list(candidates)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"evolutionary search needs distinct candidate models, got {names}")
    if layer_groups < 0:
        raise ValueError(f"layer_groups must be >= 0, got {layer_groups}")
    if search_density and method not in DENSITY_METHODS:
        raise ValueError(
            f"search_density needs a method with densities ({sorted(DENSITY_METHODS)}), got {method!r}"
        )
    if budget < 1:
        raise ValueError(f"budget must be at least one evaluation, got {budget}")
    if not 0.0 < x0 <= 1.0 or not 0.0 < sigma0:
        raise ValueError(f"need 0 < x0 <= 1 and sigma0 > 0, got x0={x0}, sigma0={sigma0}")
    lo, hi = density_bounds
    if not 0.0 < lo < hi <= 1.0:
        raise ValueError(f"density_bounds must satisfy 0 < low < high <= 1, got {density_bounds}")

    codec = _Codec(names, method, layer_groups, search_density)
    strategy = "evolutionary" + (f"-g{layer_groups}" if layer_groups else "")
    log = TrialLog(merge_and_score, strategy)

    start = np.array([x0] * codec.weight_dims + [min(max(x0, lo), hi)] * codec.density_dims)
    best_index, best = log.score(codec.decode(start))
    log.settle(best_index, accepted=True, reason="starting point: every coefficient at x0")
    best_x = start
    if codec.dims == 1 and codec.weight_dims == 1:
        # One model, one weight: every normalised merge is the model itself.
        return _result(strategy, codec.decode(best_x), best, names, log, min_share)

    rng = np.random.default_rng(seed)
    lower = np.array([0.0] * codec.weight_dims + [lo] * codec.density_dims)
    upper = np.array([1.0] * codec.weight_dims + [hi] * codec.density_dims)
    options = {
        "seed": math.nan,  # do not touch NumPy's global state; sampling goes through `randn`
        "randn": lambda *shape: rng.standard_normal(shape),
        "bounds": [lower.tolist(), upper.tolist()],
        "verbose": -9,
    }
    if popsize is not None:
        if popsize < 2:
            raise ValueError(f"popsize must be at least 2, got {popsize}")
        options["popsize"] = popsize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cma warns about flat fitness, common with proxy scores
        es = cma.CMAEvolutionStrategy(start.tolist(), sigma0, options)
        generation = 0
        while len(log.trials) < budget:
            generation += 1
            population = es.ask()
            room = budget - len(log.trials)
            losses = []
            for x in population[:room]:
                x = np.clip(np.asarray(x, dtype=float), lower, upper)
                index, value = log.score(codec.decode(x))
                losses.append(-value)
                if value > best:
                    log.settle(
                        index,
                        accepted=True,
                        reason=f"generation {generation}: new best {value:.4f} > {best:.4f}",
                    )
                    best, best_x = value, x
                else:
                    log.settle(
                        index,
                        accepted=False,
                        reason=f"generation {generation}: {value:.4f} <= best {best:.4f}",
                    )
            if len(losses) < len(population):
                break
            es.tell(population, losses)
    return _result(strategy, codec.decode(best_x), best, names, log, min_share)


class _Codec:
    """Maps the CMA-ES vector to a :class:`TrialSpec` and back to its layout."""

    def __init__(self, names: list[str], method: str, groups: int, search_density: bool) -> None:
        self.names, self.method, self.groups = names, method, groups
        self.per_model = groups + 1 if groups else 1
        self.weight_dims = len(names) * self.per_model
        self.density_dims = len(names) if search_density else 0
        self.dims = self.weight_dims + self.density_dims

    def decode(self, x: np.ndarray) -> TrialSpec:
        x = np.asarray(x, dtype=float)
        weights: dict[str, float | tuple[float, ...]] = {}
        for i, name in enumerate(self.names):
            w = [max(0.0, float(v)) for v in x[i * self.per_model : (i + 1) * self.per_model]]
            weights[name] = tuple(w) if self.groups else w[0]
        densities = None
        if self.density_dims:
            densities = {n: float(x[self.weight_dims + i]) for i, n in enumerate(self.names)}
        return TrialSpec(weights, self.method, densities)


def _result(
    strategy: str, spec: TrialSpec, best: float, names: list[str], log: TrialLog, min_share: float
) -> SearchResult:
    shares = _weight_shares(spec)
    accepted = [n for n in names if shares[n] >= min_share]
    rejected = {
        n: f"search drove its weight share to {shares[n]:.3f} (< {min_share:g}) in every layer group"
        for n in names
        if shares[n] < min_share
    }
    return SearchResult(strategy, spec, best, accepted, rejected, log.trials)


def _weight_shares(spec: TrialSpec) -> dict[str, float]:
    """Per model, its largest share of the summed weight over the layer groups."""
    as_rows = {n: (w if isinstance(w, tuple) else (w,)) for n, w in spec.weights.items()}
    groups = len(next(iter(as_rows.values())))
    totals = [sum(row[g] for row in as_rows.values()) for g in range(groups)]
    return {
        n: max((row[g] / totals[g]) if totals[g] > 0 else 0.0 for g in range(groups))
        for n, row in as_rows.items()
    }
