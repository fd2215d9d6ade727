"""Clustering a zoo into mergeable families (Model-GLUE, section 2).

Models are first grouped by architecture signature (different layouts can never be merged
tensor by tensor), then by weight similarity. The reference code makes a single greedy pass
in listing order, so reordering the zoo file can change the families. Here clustering is
complete-linkage agglomeration: two clusters join only if *every* cross pair is at or above
the threshold, the most similar admissible pair of clusters joins first, and ties are broken
by the members' sorted keys. The input order therefore never matters, and every reported
cluster is guaranteed to have its lowest internal similarity >= threshold.

The threshold can be chosen from the data (:func:`auto_threshold`): the paper's 0.95 was
calibrated on 7B Llama-2 fine-tunes and splits families of other zoos (five fine-tunes of one
small base measured 0.951-0.99 among themselves).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

CLUSTERING_VERSION = "2"  # 2: per-architecture thresholds, "auto"


@dataclass(frozen=True)
class Cluster:
    members: tuple[str, ...]  # sorted
    arch_signature: str
    min_similarity: float | None  # lowest internal pairwise similarity (None for singletons)

    def to_dict(self) -> dict:
        return {
            "members": list(self.members),
            "arch_signature": self.arch_signature,
            "min_similarity": self.min_similarity,
        }


@dataclass(frozen=True)
class ThresholdChoice:
    """How one architecture group's threshold was set: given, or the midpoint of a gap."""

    threshold: float
    rule: str  # "given" | "widest-gap" | "single-model"
    gap_low: float | None = None  # the gap the threshold sits in (auto only)
    gap_high: float | None = None
    values: tuple[float, ...] = ()  # the pairwise similarities it was chosen from, sorted

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "rule": self.rule,
            "gap_low": self.gap_low,
            "gap_high": self.gap_high,
            "values": list(self.values),
        }


def auto_threshold(values: Iterable[float], must_join: Iterable[float] = ()) -> ThresholdChoice:
    """The midpoint of the widest gap between sorted pairwise similarities.

    The values are placed between two anchors, 0 (unrelated weights: the column cosine of
    independent initialisations is about 0) and 1 (identical weights), and the widest gap
    between neighbours splits "same family" from "different family". The anchors decide the
    one-sided cases: a zoo of fine-tunes of one base (every value near 1) has its widest gap
    down to 0 and joins; a zoo of unrelated models (every value near 0) has it up to 1 and
    stays apart. ``must_join`` are the similarities of pairs known to belong together (a
    fine-tune and its declared base, two fine-tunes of one base): only gaps below the lowest
    of them are admissible, so declared families are never split by the choice. Ties go to
    the higher gap (the stricter threshold). Values outside [0, 1] are clipped.
    """
    # a NaN similarity (non-finite weights, kept with allow_nonfinite) says nothing about
    # the gap, and never links its pair (see cluster_models)
    vals = sorted(min(1.0, max(0.0, v)) for v in map(float, values) if not math.isnan(v))
    if not vals:
        return ThresholdChoice(1.0, "single-model")
    cap = min(
        (min(1.0, max(0.0, float(v))) for v in must_join if not math.isnan(float(v))),
        default=1.0,
    )
    points = sorted({0.0, 1.0, *vals})
    best: tuple[float, float, float] | None = None  # (width, low, high)
    for low, high in zip(points, points[1:], strict=False):
        if high > cap:
            break
        if best is None or high - low >= best[0]:
            best = (high - low, low, high)
    if best is None:  # the lowest declared pair is 0: nothing below it to cut
        return ThresholdChoice(0.0, "widest-gap", 0.0, 0.0, tuple(vals))
    _, low, high = best
    return ThresholdChoice((low + high) / 2, "widest-gap", low, high, tuple(vals))


def cluster_models(
    arch_signatures: dict[str, str],
    similarity: Callable[[str, str], float],
    threshold: float | Mapping[str, float],
) -> list[Cluster]:
    """Group models by architecture, then complete-linkage by ``similarity`` >= ``threshold``.

    ``arch_signatures`` maps a stable model key (a name or fingerprint) to its architecture
    signature; ``similarity(a, b)`` is only called for models of the same architecture.
    ``threshold`` is one number, or one per architecture signature. Clusters come back
    sorted by (architecture, first member).
    """
    by_arch: dict[str, list[str]] = {}
    for key, arch in sorted(arch_signatures.items()):
        by_arch.setdefault(arch, []).append(key)
    clusters: list[Cluster] = []
    for arch, keys in sorted(by_arch.items()):
        cut = threshold[arch] if isinstance(threshold, Mapping) else threshold
        matrix = np.full((len(keys), len(keys)), np.nan)
        for i, a in enumerate(keys):
            for j in range(i + 1, len(keys)):
                matrix[i, j] = matrix[j, i] = similarity(a, keys[j])
        clusters += [Cluster(m, arch, low) for m, low in cluster_matrix(keys, matrix, cut)]
    return clusters


def cluster_matrix(
    keys: list[str], matrix: np.ndarray, cut: float
) -> list[tuple[tuple[str, ...], float | None]]:
    """Complete-linkage clusters of one architecture group from its similarity matrix
    (``keys`` sorted, ``matrix[i, j]`` the similarity of ``keys[i]`` and ``keys[j]``; NaN
    never links): the members and the lowest internal similarity of each.

    The most similar admissible pair of clusters joins first; ties go to the pair whose
    sorted member lists are lexicographically smallest. Clusters stay ordered by their
    first member, so that rule is the first maximum in row-major order of the clusters'
    linkage matrix: O(N^2) per join in numpy, and no Python object per pair (a thousand
    models cluster in seconds)."""
    if not 0.0 <= cut <= 1.0:
        raise ValueError(f"similarity threshold must be in [0, 1], got {cut}")
    if list(keys) != sorted(keys):
        raise ValueError("cluster_matrix: keys must be sorted")
    n = len(keys)
    link = np.array(matrix, dtype=np.float64, copy=True)  # complete linkage between clusters
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    score = np.where(upper & ~np.isnan(link), link, -np.inf)  # admissible joins, row-major
    members: list[list[str]] = [[k] for k in keys]
    lowest: list[float | None] = [None] * n
    alive = np.ones(n, dtype=bool)
    while n > 1:
        flat = int(np.argmax(score))
        i, j = divmod(flat, n)
        if not score[i, j] >= cut:
            break
        lowest[i] = min(x for x in (lowest[i], lowest[j], float(link[i, j])) if x is not None)
        members[i] = sorted(members[i] + members[j])
        row = np.minimum(link[i], link[j])  # NaN in either: NaN (never links)
        link[i, :] = row
        link[:, i] = row
        alive[j] = False
        score[j, :] = -np.inf
        score[:, j] = -np.inf
        usable = alive & ~np.isnan(row)
        before, after = np.arange(n) < i, np.arange(n) > i
        score[before, i] = np.where(usable[before], row[before], -np.inf)
        score[i, after] = np.where(usable[after], row[after], -np.inf)
    return [(tuple(members[i]), lowest[i]) for i in range(n) if alive[i]]
