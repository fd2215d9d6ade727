"""Stage 2: cluster the zoo into mergeable families (architecture, then similarity)."""

from __future__ import annotations

from model_glue.clustering import CLUSTERING_VERSION, cluster_models
from storage import ArtifactStore
from tasks._stage import Stage, load_record, save_record

STAGE = Stage(
    name="cluster",
    code_version=f"cluster-{CLUSTERING_VERSION}",
    key_parts=lambda models, similarity_keys, metric, threshold: {
        "models": sorted((m["fingerprint"], m["arch_signature"]) for m in models),
        "similarity": sorted(similarity_keys),
        "metric": metric,
        "threshold": threshold,
    },
)


def _cluster(
    store_url: str, models: list[dict], similarity_keys: list[str], metric: str, threshold: float
) -> dict:
    """Cluster ``models`` (fingerprint records) using the similarity records named by key."""
    store = ArtifactStore(store_url)
    key = STAGE.key(
        {
            "models": models,
            "similarity_keys": similarity_keys,
            "metric": metric,
            "threshold": threshold,
        }
    )
    if (record := load_record(store, key)) is not None:
        return record
    sims: dict[tuple[str, str], float] = {}
    for sk in similarity_keys:
        for row in store.get_json("record", sk)["pairs"]:
            if row["metric"] == metric:
                sims[tuple(sorted((row["model_a"], row["model_b"])))] = row["value"]
    by_fp = {m["fingerprint"]: m for m in models}
    clusters = cluster_models(
        {fp: m["arch_signature"] for fp, m in by_fp.items()},
        lambda a, b: sims[(a, b) if a < b else (b, a)],
        threshold,
    )
    out = []
    for c in clusters:
        members = sorted((by_fp[fp]["name"], fp) for fp in c.members)
        out.append(
            {
                "members": [{"name": n, "fingerprint": fp} for n, fp in members],
                "arch_signature": c.arch_signature,
                "min_similarity": c.min_similarity,
            }
        )
    out.sort(key=lambda c: (-len(c["members"]), c["members"][0]["name"]))
    return save_record(
        store, key, {"metric": metric, "threshold": threshold, "clusters": out}, STAGE.name
    )


cluster_zoo = STAGE.task(_cluster)
