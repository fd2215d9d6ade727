"""Stage 1: pairwise weight similarity inside each architecture group.

Pairs are stored one artifact each, keyed by the two content fingerprints and the tensor
groups, so a zoo refresh that adds one model computes only that model's pairs (in one
streaming pass over it and its partners) and reuses every other pair from the store.
"""

from __future__ import annotations

from model_glue.checkpoint import Checkpoint
from model_glue.similarity import SIMILARITY_VERSION, pairwise_similarity
from storage import Artifact, ArtifactStore, Details, Lineage
from tasks.stage import Call, Stage, stable_hash
from tasks.versions import SIMILARITY

PAIR_KIND = "similarity_pair"


def pair_key(fp_a: str, fp_b: str, groups: list[str], base_fp: str | None = None) -> str:
    a, b = sorted((fp_a, fp_b))
    parts = {"pair": [a, b], "groups": sorted(groups), "v": SIMILARITY_VERSION}
    if base_fp is not None:  # task-vector cosine is relative to a base: another pair artifact
        parts["base"] = base_fp
    return stable_hash(parts)


def _similarity(
    store: ArtifactStore, key: str, models: list[dict], groups: list[str], base: dict | None = None
) -> dict:
    """``models``: refs with name, uri and fingerprint, all of one architecture. With a
    ``base`` (their declared common base), task-vector cosine is computed too."""
    base_fp = base["fingerprint"] if base else None
    by_fp = {m["fingerprint"]: m for m in models}
    fps = sorted(by_fp)
    pairs = [(a, b) for i, a in enumerate(fps) for b in fps[i + 1 :]]
    missing = [p for p in pairs if not store.exists(PAIR_KIND, pair_key(*p, groups, base_fp))]
    if missing:
        involved = sorted({fp for p in missing for fp in p})
        ckpts = {fp: Checkpoint(by_fp[fp]["uri"]) for fp in involved}
        result = pairwise_similarity(
            ckpts, groups=groups, pairs=missing, base=Checkpoint(base["uri"]) if base else None
        )
        for a, b in missing:
            store.put_json(
                PAIR_KIND,
                pair_key(a, b, groups, base_fp),
                {
                    "pair": [a, b],
                    "summary": result.summary[(a, b)],
                    "per_tensor": result.per_tensor[(a, b)],
                },
            )
    layout = Checkpoint(models[0]["uri"]).layout  # headers only
    rows, tensor_rows = [], []
    for a, b in pairs:
        pair = store.get_json(PAIR_KIND, pair_key(a, b, groups, base_fp))
        na, nb = sorted((by_fp[a]["name"], by_fp[b]["name"]))
        fa, fb = (a, b) if by_fp[a]["name"] == na else (b, a)
        rows += [
            {"model_a": fa, "model_b": fb, "name_a": na, "name_b": nb, "metric": m, "value": v}
            for m, v in sorted(pair["summary"].items())
        ]
        tensor_rows += [
            {
                "model_a": fa,
                "model_b": fb,
                "tensor": t,
                "layer": layout.layer_of(t),
                "metric": "column_cosine",
                "value": v,
            }
            for t, v in pair["per_tensor"].items()
        ]
    return {
        "groups": sorted(groups),
        "base": base["name"] if base else None,
        "models": [{"name": m["name"], "fingerprint": m["fingerprint"]} for m in models],
        "pairs": rows,
        "tensor_pairs": tensor_rows,
        "computed_pairs": len(missing),
        "reused_pairs": len(pairs) - len(missing),
    }


def _lineage(call: Call, r: dict) -> Lineage:
    models, base = call.params["models"], call.params.get("base")
    arch = (models[0].get("arch_signature") or "")[:8]
    tensor_set = ",".join(sorted(call.params["groups"]))
    # with a base, this record adds the task-vector cosines; the raw-weight rows come from
    # the group's own similarity call
    pairs = [p for p in r["pairs"] if base is None or p["metric"] == "task_vector_cosine"]
    details = [Details("similarities", pairs, {"tensor_set": tensor_set})]
    if base is None:
        details.append(Details("tensor_similarities", r["tensor_pairs"]))
    return Lineage(
        artifacts=[
            Artifact(
                r["key"],
                kind="similarity",
                name=f"similarity:{arch}" + (f":vs-{base['name']}" if base else ""),
                stage="similarity",
                parents=tuple((m["fingerprint"], "input") for m in models),
            )
        ],
        details=details,
    )


STAGE = Stage(
    name="similarity",
    compute=_similarity,
    uses=SIMILARITY,
    key_parts=lambda a: {
        "models": sorted(m["fingerprint"] for m in a["models"]),
        "groups": sorted(a["groups"]),
        "base": a["base"] and a["base"]["fingerprint"],
    },
    lineage=_lineage,
)

compute_similarity = STAGE.task()
