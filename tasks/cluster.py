"""Stage 2: cluster the zoo into mergeable families (architecture, then similarity).

With ``threshold: auto`` each architecture group gets its own threshold from its measured
similarities (:func:`model_glue.clustering.auto_threshold`); declared ``base:`` relations
(``related`` pairs of fingerprints) are the evidence of which pairs must join. The record
keeps, per group, the chosen value, the gap it sits in and the values it was chosen from.
"""

from __future__ import annotations

import numpy as np

from model_glue.clustering import Cluster, ThresholdChoice, auto_threshold, cluster_matrix
from storage import Artifact, ArtifactStore, Details, Lineage
from tasks.similarity import ALL_ROWS_UP_TO, load_matrices
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
    by_fp = {m["fingerprint"]: m for m in models}
    matrices = [load_matrices(store, store.get_json(RECORD_KIND, sk)) for sk in similarity_keys]
    groups: dict[str, list[str]] = {}
    for fp, m in sorted(by_fp.items()):
        groups.setdefault(m["arch_signature"], []).append(fp)
    declared = {tuple(sorted(p)) for p in related}
    choices, clusters = {}, []
    for arch, fps in sorted(groups.items()):
        sim = _group_matrix(fps, matrices, metric, by_fp)
        upper = np.triu_indices(len(fps), 1)
        values = sim[upper].tolist()
        if threshold != "auto":
            choices[arch] = ThresholdChoice(float(threshold), "given", values=tuple(sorted(values)))
        else:
            pos = {fp: i for i, fp in enumerate(fps)}
            must = [sim[pos[a], pos[b]] for a, b in declared if a in pos and b in pos]
            choices[arch] = auto_threshold(values, must)
        clusters += [
            Cluster(m, arch, low) for m, low in cluster_matrix(fps, sim, choices[arch].threshold)
        ]
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
            {"arch_signature": arch, **_listed(c.to_dict())} for arch, c in sorted(choices.items())
        ],
        "clusters": out,
    }


def _listed(choice: dict) -> dict:
    """A threshold choice with its values (every pair's, up to ALL_ROWS_UP_TO of them: a
    larger group keeps its count; its values are in the similarity matrices)."""
    n = len(choice["values"])
    return choice | {"n_pairs": n, "values": choice["values"] if n <= ALL_ROWS_UP_TO else []}


def _group_matrix(fps: list[str], matrices: list[dict], metric: str, by_fp: dict) -> np.ndarray:
    """One architecture group's ``metric`` matrix, assembled from the similarity records
    that hold its pairs (an error names a pair no record holds)."""
    n = len(fps)
    out = np.full((n, n), np.nan)
    np.fill_diagonal(out, 1.0)
    known = np.eye(n, dtype=bool)
    pos = {fp: i for i, fp in enumerate(fps)}
    for m in matrices:
        if metric not in m:
            continue
        theirs = [str(fp) for fp in m["fingerprints"]]
        mine = [(i, pos[fp]) for i, fp in enumerate(theirs) if fp in pos]
        if len(mine) < 2:
            continue
        src, dst = (np.array(x) for x in zip(*mine, strict=True))
        out[np.ix_(dst, dst)] = m[metric][np.ix_(src, src)]
        known[np.ix_(dst, dst)] = True
    if not known.all():
        i, j = np.argwhere(~known)[0]
        raise ValueError(
            f"clustering: no {metric} similarity between {by_fp[fps[i]]['name']} and "
            f"{by_fp[fps[j]]['name']}"
        )
    return out


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
            "n_pairs": t.get("n_pairs", len(t.get("values", ()))),
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
        f"{t['gap_low']:.3f}..{t['gap_high']:.3f} among {t.get('n_pairs', len(t['values']))} pairs, "
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
