"""Clustering a zoo into mergeable families (Model-GLUE, section 2).

Models are first grouped by architecture signature (different layouts can never be merged
tensor by tensor), then by weight similarity. The reference code makes a single greedy pass
in listing order, so reordering the zoo file can change the families. Here clustering is
complete-linkage agglomeration: two clusters join only if *every* cross pair is at or above
the threshold, the most similar admissible pair of clusters joins first, and ties are broken
by the members' sorted keys. The input order therefore never matters, and every reported
cluster is guaranteed to have its lowest internal similarity >= threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

CLUSTERING_VERSION = "1"


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


def cluster_models(
    arch_signatures: dict[str, str],
    similarity: Callable[[str, str], float],
    threshold: float,
) -> list[Cluster]:
    """Group models by architecture, then complete-linkage by ``similarity`` >= ``threshold``.

    ``arch_signatures`` maps a stable model key (a name or fingerprint) to its architecture
    signature; ``similarity(a, b)`` is only called for models of the same architecture.
    Clusters come back sorted by (architecture, first member).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"similarity threshold must be in [0, 1], got {threshold}")
    by_arch: dict[str, list[str]] = {}
    for key, arch in sorted(arch_signatures.items()):
        by_arch.setdefault(arch, []).append(key)
    clusters: list[Cluster] = []
    for arch, keys in sorted(by_arch.items()):
        sim = {(a, b): similarity(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]}

        def s(a: str, b: str, sim: dict = sim) -> float:
            return sim[(a, b) if a < b else (b, a)]

        groups: list[list[str]] = [[k] for k in keys]
        while True:
            best: tuple[float, tuple[str, ...], tuple[str, ...]] | None = None
            for i, gi in enumerate(groups):
                for gj in groups[i + 1 :]:
                    link = min(s(a, b) for a in gi for b in gj)  # complete linkage
                    if link < threshold:
                        continue
                    cand = (link, tuple(gi), tuple(gj))
                    # highest link first; ties by lexicographically smallest member lists
                    if best is None or (-cand[0], cand[1], cand[2]) < (-best[0], best[1], best[2]):
                        best = cand
            if best is None:
                break
            _, gi, gj = best
            groups = [g for g in groups if tuple(g) not in (gi, gj)] + [sorted(gi + gj)]
            groups.sort()
        for g in groups:
            internal = [s(a, b) for i, a in enumerate(g) for b in g[i + 1 :]]
            clusters.append(Cluster(tuple(g), arch, min(internal) if internal else None))
    return clusters
