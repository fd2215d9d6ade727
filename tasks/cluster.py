"""Stage 2: cluster the zoo into mergeable families (architecture, then similarity).

With ``threshold: auto`` each architecture group gets its own threshold from its measured
similarities (:func:`model_glue.clustering.auto_threshold`); declared ``base:`` relations
(``related`` pairs of fingerprints) are the evidence of which pairs must join. The record
keeps, per group, the chosen value, the gap it sits in and the values it was chosen from.
"""

from __future__ import annotations

from model_glue.clustering import ThresholdChoice, auto_threshold, cluster_models
from storage import Artifact, ArtifactStore, Details, Lineage
from tasks.stage import RECORD_KIND, Call, Stage
from tasks.versions import CLUSTERING


def _cluster(
    store: ArtifactStore,
    key: str,
    models: list[dict],
    similarity_keys: list[str],
    metric: str,
    threshold: float | str,
    related: list[list[str]] = (),  # type: ignore[assignment]
) -> dict:
    """Cluster ``models`` (refs with fingerprint and arch_signature) using the similarity
    records named by key. ``threshold``: a number, or ``"auto"``; ``related``: fingerprint
    pairs declared to be of one family (only read by ``auto``)."""
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
    return {
        "metric": metric,
        "threshold": threshold,
        "thresholds": [
            {"arch_signature": arch, **c.to_dict()} for arch, c in sorted(choices.items())
        ],
        "clusters": out,
    }


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


def _cluster_rows(clusters: list[dict]) -> list[dict]:
    """The record's clusters as ``clusters`` rows: the cluster number is the position."""
    return [
        {"model_fingerprint": m["fingerprint"], "cluster": i}
        for i, c in enumerate(clusters)
        for m in c["members"]
    ]


def _threshold_rows(thresholds: list[dict]) -> list[dict]:
    """The record's per-architecture thresholds as ``cluster_thresholds`` rows."""
    return [
        {
            "arch_signature": t["arch_signature"],
            "rule": t["rule"],
            "threshold": float(t["threshold"]),
            "gap_low": t.get("gap_low"),
            "gap_high": t.get("gap_high"),
            "n_pairs": len(t.get("values", ())),
            "pair_values": list(t.get("values", ())),
        }
        for t in thresholds
    ]


def _lineage(call: Call, r: dict) -> Lineage:
    keys = call.params["similarity_keys"]
    parents = keys or [m["fingerprint"] for m in call.params["models"]]
    return Lineage(
        artifacts=[
            Artifact(
                r["key"],
                kind="clustering",
                name="clustering",
                stage="cluster",
                parents=tuple((p, "input") for p in parents),
            )
        ],
        details=[
            Details("clusters", _cluster_rows(r["clusters"]), {"clustering_id": r["key"]}),
            Details(
                "cluster_thresholds",
                _threshold_rows(r.get("thresholds", [])),
                {"clustering_id": r["key"], "metric": r["metric"]},
            ),
        ],
    )


def _describe(r: dict) -> list[str]:
    lines = [
        f"threshold {t['threshold']:.3f} on {r['metric']} (auto: widest gap "
        f"{t['gap_low']:.3f}..{t['gap_high']:.3f} among {len(t['values'])} pairs, "
        f"arch {t['arch_signature'][:8]})"
        for t in r.get("thresholds", [])
        if t["rule"] == "widest-gap"
    ]
    for i, c in enumerate(r["clusters"]):
        low = c["min_similarity"]
        lines.append(
            f"cluster {i}: {', '.join(m['name'] for m in c['members'])}"
            + ("" if low is None else f" (lowest internal {r['metric']} {low:.3f})")
        )
    return lines


STAGE = Stage(
    name="cluster",
    compute=_cluster,
    uses=CLUSTERING,
    key_parts=lambda a: {
        "models": sorted((m["fingerprint"], m["arch_signature"]) for m in a["models"]),
        "similarity_keys": sorted(a["similarity_keys"]),
        "related": sorted(sorted(p) for p in a["related"]),
    },
    lineage=_lineage,
    describe=_describe,
)

cluster_zoo = STAGE.task()
