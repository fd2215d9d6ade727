"""Stage 2: cluster the zoo into mergeable families (architecture, then similarity).

With ``threshold: auto`` each architecture group gets its own threshold from its measured
similarities (:func:`model_glue.clustering.auto_threshold`); declared ``base:`` relations
(``related`` pairs of fingerprints) are the evidence of which pairs must join. The record
keeps, per group, the chosen value, the gap it sits in and the values it was chosen from.
"""

from __future__ import annotations

from model_glue.clustering import (
    CLUSTERING_VERSION,
    ThresholdChoice,
    auto_threshold,
    cluster_models,
)
from storage import ArtifactStore
from tasks._stage import RECORD_KIND, Stage, load_record, save_record

STAGE = Stage(
    name="cluster",
    code_version=f"cluster-{CLUSTERING_VERSION}",
    key_parts=lambda models, similarity_keys, metric, threshold, related=(): {
        "models": sorted((m["fingerprint"], m["arch_signature"]) for m in models),
        "similarity": sorted(similarity_keys),
        "metric": metric,
        "threshold": threshold,
        "related": sorted(sorted(p) for p in related) if threshold == "auto" else [],
    },
)


def _cluster(
    store_url: str,
    models: list[dict],
    similarity_keys: list[str],
    metric: str,
    threshold: float | str,
    related: list[list[str]] = (),  # type: ignore[assignment]
) -> dict:
    """Cluster ``models`` (fingerprint records) using the similarity records named by key.

    ``threshold``: a number, or ``"auto"``; ``related``: fingerprint pairs declared to be of
    one family (only read by ``auto``)."""
    store = ArtifactStore(store_url)
    key = STAGE.key(
        {
            "models": models,
            "similarity_keys": similarity_keys,
            "metric": metric,
            "threshold": threshold,
            "related": related,
        }
    )
    if (record := load_record(store, key)) is not None:
        return record
    sims: dict[tuple[str, str], float] = {}
    for sk in similarity_keys:
        for row in store.get_json(RECORD_KIND, sk)["pairs"]:
            if row["metric"] == metric:
                sims[tuple(sorted((row["model_a"], row["model_b"])))] = row["value"]
    by_fp = {m["fingerprint"]: m for m in models}
    choices = _thresholds(by_fp, sims, metric, threshold, related)
    clusters = cluster_models(
        {fp: m["arch_signature"] for fp, m in by_fp.items()},
        lambda a, b: sims[(a, b) if a < b else (b, a)],
        {arch: c.threshold for arch, c in choices.items()},
    )
    out = []
    for c in clusters:
        members = sorted((by_fp[fp]["name"], fp) for fp in c.members)
        out.append(
            {
                "members": [{"name": n, "fingerprint": fp} for n, fp in members],
                "arch_signature": c.arch_signature,
                "min_similarity": c.min_similarity,
                "threshold": choices[c.arch_signature].threshold,
            }
        )
    out.sort(key=lambda c: (-len(c["members"]), c["members"][0]["name"]))
    record = {
        "metric": metric,
        "threshold": threshold,
        "thresholds": [
            {"arch_signature": arch, **c.to_dict()} for arch, c in sorted(choices.items())
        ],
        "clusters": out,
    }
    return save_record(store, key, record, STAGE.name)


def _thresholds(
    by_fp: dict[str, dict],
    sims: dict[tuple[str, str], float],
    metric: str,
    threshold: float | str,
    related: list[list[str]],
) -> dict[str, ThresholdChoice]:
    """One threshold per architecture group: the given number, or chosen from its values."""
    groups: dict[str, list[str]] = {}
    for fp, m in sorted(by_fp.items()):
        groups.setdefault(m["arch_signature"], []).append(fp)
    declared = {tuple(sorted(p)) for p in related}
    choices = {}
    for arch, fps in groups.items():
        pairs = [(a, b) for i, a in enumerate(fps) for b in fps[i + 1 :]]
        missing = [p for p in pairs if p not in sims]
        if missing:
            a, b = missing[0]
            raise ValueError(
                f"clustering: no {metric} similarity between {by_fp[a]['name']} and {by_fp[b]['name']}"
            )
        values = [sims[p] for p in pairs]
        if threshold != "auto":
            choices[arch] = ThresholdChoice(float(threshold), "given", values=tuple(sorted(values)))
        else:
            choices[arch] = auto_threshold(values, [sims[p] for p in pairs if p in declared])
    return choices


cluster_zoo = STAGE.task(_cluster)
