"""Stage 1: pairwise weight similarity inside each architecture group.

Pairs are stored one artifact each, keyed by the two content fingerprints and the tensor
groups, so a zoo refresh that adds one model computes only that model's pairs (in one
streaming pass over it and its partners) and reuses every other pair from the store.
"""

from __future__ import annotations

from model_glue.checkpoint import Checkpoint
from model_glue.similarity import (
    SIMILARITY_VERSION,
    SimilarityError,
    pairwise_similarity,
    sketch_similarity,
)
from storage import Artifact, ArtifactStore, Details, Lineage
from tasks.stage import Call, Stage, stable_hash
from tasks.versions import SIMILARITY

PAIR_KIND = "similarity_pair"
# a pair whose sketched value lies this close to the threshold is computed exactly: the
# sketch's error (k = 32: at most 0.002 measured on the demo zoo) with room to spare
EXACT_MARGIN = 0.01


def pair_key(
    fp_a: str, fp_b: str, groups: list[str], base_fp: str | None = None, via: str = "exact"
) -> str:
    a, b = sorted((fp_a, fp_b))
    parts = {"pair": [a, b], "groups": sorted(groups), "v": SIMILARITY_VERSION}
    if base_fp is not None:  # task-vector cosine is relative to a base: another pair artifact
        parts["base"] = base_fp
    if via != "exact":  # an estimate is stored apart from the exact value
        parts["via"] = via
    return stable_hash(parts)


def _similarity(
    store: ArtifactStore,
    key: str,
    models: list[dict],
    groups: list[str],
    base: dict | None = None,
    exact: bool = False,
    metric: str = "sim_all",
    threshold: float | str = "auto",
) -> dict:
    """``models``: refs with name, uri, fingerprint and sketch key, all of one
    architecture. With a ``base`` (their declared common base), task-vector cosine is
    computed too.

    Pairs come from the models' sketches (no checkpoint is read), except with ``exact``
    and for pairs whose ``metric`` lies within :data:`EXACT_MARGIN` of ``threshold`` (for
    ``auto``: the widest-gap threshold of these estimates): those read their two models.
    A pair already computed exactly is never estimated again."""
    base_fp = base["fingerprint"] if base else None
    by_fp = {m["fingerprint"]: m for m in models}
    fps = sorted(by_fp)
    pairs = [(a, b) for i, a in enumerate(fps) for b in fps[i + 1 :]]

    def stored(p: tuple[str, str], via: str) -> str | None:
        k = pair_key(*p, groups, base_fp, via)
        return k if store.exists(PAIR_KIND, k) else None

    found = {p: stored(p, "exact") or (None if exact else stored(p, "sketch")) for p in pairs}
    missing = [p for p, k in found.items() if k is None]
    estimated: dict[tuple[str, str], dict] = {}
    if missing and not exact:
        estimated = _from_sketches(store, by_fp, missing, groups, base)
    values = {
        p: estimated[p] if p in estimated else store.get_json(PAIR_KIND, found[p])
        for p in pairs
        if p in estimated or found[p]
    }
    near = [] if exact else _near_threshold(values, metric, threshold)
    todo = sorted(set(missing if exact else near))
    if todo:
        involved = sorted({fp for p in todo for fp in p})
        ckpts = {fp: Checkpoint(by_fp[fp]["uri"]) for fp in involved}
        result = pairwise_similarity(
            ckpts, groups=groups, pairs=todo, base=Checkpoint(base["uri"]) if base else None
        )
        for p in todo:
            values[p] = {
                "pair": list(p),
                "via": "exact",
                "summary": result.summary[p],
                "per_tensor": result.per_tensor[p],
            }
    for p in missing + todo:
        store.put_json(PAIR_KIND, pair_key(*p, groups, base_fp, values[p]["via"]), values[p])
    layout = Checkpoint(models[0]["uri"]).layout  # headers only
    rows, tensor_rows = [], []
    for a, b in pairs:
        pair = values[(a, b)]
        na, nb = sorted((by_fp[a]["name"], by_fp[b]["name"]))
        fa, fb = (a, b) if by_fp[a]["name"] == na else (b, a)
        via = pair.get("via", "exact")
        rows += [
            {"model_a": fa, "model_b": fb, "name_a": na, "name_b": nb, "metric": m, "value": v}
            | {"via": via}
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
        "sketched_pairs": len(set(estimated) - set(todo)),
        "exact_pairs": len(todo),
    }


def _from_sketches(
    store: ArtifactStore,
    by_fp: dict[str, dict],
    pairs: list[tuple[str, str]],
    groups: list[str],
    base: dict | None,
) -> dict[tuple[str, str], dict]:
    """Each pair estimated from the two models' sketches (the fingerprint stage's)."""
    from model_glue.sketch import load_sketch
    from tasks.fingerprint import SKETCH_FILE, SKETCH_KIND

    def sketch(m: dict) -> dict:
        if not m.get("sketch") or not store.exists(SKETCH_KIND, m["sketch"]):
            raise SimilarityError(
                f"{m['name']}: no sketch in the store (fingerprint it again, or set "
                "similarity.exact: true)"
            )
        return load_sketch(store.local_path(SKETCH_KIND, m["sketch"]) / SKETCH_FILE)

    involved = sorted({fp for p in pairs for fp in p})
    sketches = {fp: sketch(by_fp[fp]) for fp in involved}
    layout = Checkpoint(by_fp[involved[0]]["uri"]).layout  # headers only
    result = sketch_similarity(
        sketches,
        layout,
        groups=groups,
        pairs=pairs,
        base=(base["fingerprint"], sketch(base)) if base else None,
    )
    return {
        p: {
            "pair": list(p),
            "via": "sketch",
            "summary": result.summary[p],
            "per_tensor": result.per_tensor[p],
        }
        for p in pairs
    }


def _near_threshold(
    values: dict[tuple[str, str], dict], metric: str, threshold: float | str
) -> list[tuple[str, str]]:
    """The estimated pairs whose ``metric`` is within the margin of the threshold."""
    estimates = {p: v for p, v in values.items() if v.get("via") == "sketch"}
    if not estimates:
        return []
    if threshold == "auto":
        from model_glue.clustering import auto_threshold

        scores = [v["summary"].get(metric) for v in values.values()]
        threshold = auto_threshold([x for x in scores if x is not None]).threshold
    return [
        p
        for p, v in estimates.items()
        if (x := v["summary"].get(metric)) is not None and abs(x - float(threshold)) <= EXACT_MARGIN
    ]


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
        # a model's sketch is keyed by its fingerprint stage: same content, same sketch
        "models": sorted(m["fingerprint"] for m in a["models"]),
        "groups": sorted(a["groups"]),
        "base": a["base"] and a["base"]["fingerprint"],
    },
    lineage=_lineage,
)

compute_similarity = STAGE.task()
