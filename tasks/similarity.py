"""Stage 1: pairwise weight similarity inside each architecture group.

Pairs are stored one artifact each, keyed by the two content fingerprints and the tensor
groups, so a zoo refresh that adds one model computes only that model's pairs (in one
streaming pass over it and its partners) and reuses every other pair from the store.
"""

from __future__ import annotations

from model_glue.architectures import Layout
from model_glue.checkpoint import Checkpoint
from model_glue.merge.tokenizer import config_vocab_sizes
from model_glue.similarity import (
    SIMILARITY_VERSION,
    SimilarityError,
    pairwise_similarity,
    select_tensors,
    sketch_matrices,
    sketch_similarity,
)
from storage import Artifact, ArtifactStore, Details, Lineage
from tasks.stage import Call, Stage, stable_hash
from tasks.versions import SIMILARITY

PAIR_KIND = "similarity_pair"  # one exactly computed pair
MATRIX_KIND = "similarity_matrix"  # a group's matrices, one per metric, in fingerprint order
MATRIX_FILE = "matrices.npz"
# a pair whose sketched value lies this close to the threshold is computed exactly: twice
# the error sketches are sized for (model_glue.sketch.ERROR_BUDGET: sim_all within 0.005)
EXACT_MARGIN = 0.01
# groups with more pairs list only the pairs near or above the threshold in their record
# and lineage (every value stays in the group's matrices)
ALL_ROWS_UP_TO = 20_000


def pair_key(fp_a: str, fp_b: str, groups: list[str], base_fp: str | None = None) -> str:
    """The store key of an exactly computed pair."""
    a, b = sorted((fp_a, fp_b))
    parts = {"pair": [a, b], "groups": sorted(groups), "v": SIMILARITY_VERSION}
    if base_fp is not None:  # task-vector cosine is relative to a base: another pair artifact
        parts["base"] = base_fp
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
    """Every pair of ``models`` (refs with name, uri, fingerprint and sketch key, all of
    one architecture), stored as one matrix per metric (``MATRIX_KIND``). With a ``base``
    (their declared common base), task-vector cosine is computed too.

    Values come from the models' sketches (no checkpoint is read), except with ``exact``
    and for pairs whose ``metric`` lies within :data:`EXACT_MARGIN` of ``threshold`` (for
    ``auto``: the widest-gap threshold of the estimates): those read their two models and
    are stored one artifact per pair, so that no pair is ever computed exactly twice."""
    import numpy as np

    base_fp = base["fingerprint"] if base else None
    by_fp = {m["fingerprint"]: m for m in models}
    fps = sorted(by_fp)
    index = {fp: i for i, fp in enumerate(fps)}
    n = len(fps)
    pairs = [(a, b) for i, a in enumerate(fps) for b in fps[i + 1 :]]
    stored_exact = {k for _, k in store.list(PAIR_KIND)} if pairs else set()
    done = {p for p in pairs if pair_key(*p, groups, base_fp) in stored_exact}
    layout = Checkpoint(models[0]["uri"]).layout  # headers only
    tensors = select_tensors(layout, groups)
    if not tensors:
        raise SimilarityError(
            f"{models[0]['uri']}: no {'/'.join(groups)} tensors to compare ({layout.describe()})"
        )
    matrices: dict[str, np.ndarray] = {}

    def put(p: tuple[str, str], summary: dict, per_tensor: dict) -> None:
        i, j = index[p[0]], index[p[1]]
        for m, v in {**summary, **per_tensor}.items():
            if m not in matrices:
                matrices[m] = np.full((n, n), np.nan)
                np.fill_diagonal(matrices[m], 1.0)
            matrices[m][i, j] = matrices[m][j, i] = v

    if not exact and "embed" in groups:  # sketches of different vocabularies do not compare
        exact = len(set(config_vocab_sizes([m["uri"] for m in models]))) > 1
    if not exact:
        sketched = _from_sketches(store, by_fp, fps, groups, base, layout, tensors)
        for p, summary, per_tensor in sketched:
            put(p, summary, per_tensor)
    todo = sorted(set(pairs) - done) if exact else []
    for p in sorted(done):
        pair = store.get_json(PAIR_KIND, pair_key(*p, groups, base_fp))
        put(p, pair["summary"], pair["per_tensor"])
    if not exact:
        todo = [
            p for p in _near_threshold(matrices, index, pairs, metric, threshold) if p not in done
        ]
    if todo:
        involved = sorted({fp for p in todo for fp in p})
        ckpts = {fp: Checkpoint(by_fp[fp]["uri"]) for fp in involved}
        result = pairwise_similarity(
            ckpts, groups=groups, pairs=todo, base=Checkpoint(base["uri"]) if base else None
        )
        for p in todo:
            pair = {
                "pair": list(p),
                "summary": result.summary[p],
                "per_tensor": result.per_tensor[p],
            }
            store.put_json(PAIR_KIND, pair_key(*p, groups, base_fp), pair)
            done.add(p)
            put(p, pair["summary"], pair["per_tensor"])
    with store.writing(MATRIX_KIND, key, meta={"stage": "similarity"}) as tmp:
        np.savez(tmp / MATRIX_FILE, fingerprints=np.array(fps), **matrices)
    summary_metrics = sorted(m for m in matrices if m not in tensors)
    listed = pairs
    if len(pairs) > ALL_ROWS_UP_TO:  # the pairs near or above the threshold, and the exact
        cut = _cut(matrices, index, pairs, metric, threshold) - EXACT_MARGIN
        listed = [
            p for p in pairs if p in done or matrices[metric][index[p[0]], index[p[1]]] >= cut
        ]
    rows, tensor_rows = [], []
    for a, b in listed:
        i, j = index[a], index[b]
        na, nb = sorted((by_fp[a]["name"], by_fp[b]["name"]))
        fa, fb = (a, b) if by_fp[a]["name"] == na else (b, a)
        how = "exact" if (a, b) in done else "sketch"
        rows += [
            {"model_a": fa, "model_b": fb, "name_a": na, "name_b": nb, "metric": m}
            | {"value": float(matrices[m][i, j]), "via": how}
            for m in summary_metrics
        ]
        tensor_rows += [
            {
                "model_a": fa,
                "model_b": fb,
                "tensor": t,
                "layer": layout.layer_of(t),
                "metric": "column_cosine",
                "value": float(matrices[t][i, j]),
            }
            for t in tensors
            if t in matrices
        ]
    return {
        "groups": sorted(groups),
        "base": base["name"] if base else None,
        "models": [{"name": by_fp[fp]["name"], "fingerprint": fp} for fp in fps],
        "matrix": key,
        "n_pairs": len(pairs),
        "pairs": rows,
        "tensor_pairs": tensor_rows,
        "exact_pairs": len(todo),
        "reused_exact_pairs": len(done) - len(todo),
        "sketched_pairs": len(pairs) - len(done),
    }


def _from_sketches(
    store: ArtifactStore,
    by_fp: dict[str, dict],
    fps: list[str],
    groups: list[str],
    base: dict | None,
    layout: Layout,
    tensors: list[str],
):
    """(pair, summary, per-tensor values) of every pair, estimated from the models'
    sketches (the fingerprint stage's); a group without a base goes block by block."""
    from model_glue.sketch import load_sketch
    from tasks.fingerprint import SKETCH_FILE, SKETCH_KIND

    def sketch(m: dict) -> dict:
        if not m.get("sketch") or not store.exists(SKETCH_KIND, m["sketch"]):
            raise SimilarityError(
                f"{m['name']}: no sketch in the store (fingerprint it again, or set "
                "similarity.exact: true)"
            )
        return load_sketch(store.local_path(SKETCH_KIND, m["sketch"]) / SKETCH_FILE)

    pairs = [(a, b) for i, a in enumerate(fps) for b in fps[i + 1 :]]
    if base is not None:  # task vectors: a family, pair by pair
        sketches = {fp: sketch(by_fp[fp]) for fp in fps}
        result = sketch_similarity(
            sketches, layout, groups=groups, base=(base["fingerprint"], sketch(base))
        )
        for p in pairs:
            yield p, result.summary[p], result.per_tensor[p]
        return
    m = sketch_matrices(
        fps,
        lambda fp: sketch(by_fp[fp]),
        layout,
        groups=groups,
        per_tensor=True,
    )
    summary_keys = [k for k in m if k not in tensors]
    for i, a in enumerate(fps):
        for j in range(i + 1, len(fps)):
            yield (
                (a, fps[j]),
                {k: float(m[k][i, j]) for k in summary_keys},
                {t: float(m[t][i, j]) for t in tensors if t in m},
            )


def _cut(matrices: dict, index: dict, pairs: list, metric: str, threshold: float | str) -> float:
    """The threshold the estimates are refined around (``auto``: theirs)."""
    if threshold != "auto":
        return float(threshold)
    from model_glue.clustering import auto_threshold

    m = matrices.get(metric)
    if m is None or not pairs:
        return 1.0
    values = [m[index[a], index[b]] for a, b in pairs]
    return auto_threshold(values).threshold


def _near_threshold(
    matrices: dict, index: dict, pairs: list, metric: str, threshold: float | str
) -> list[tuple[str, str]]:
    """The pairs whose estimated ``metric`` is within the margin of the threshold."""
    if metric not in matrices:
        return []
    cut = _cut(matrices, index, pairs, metric, threshold)
    m = matrices[metric]
    return [p for p in pairs if abs(m[index[p[0]], index[p[1]]] - cut) <= EXACT_MARGIN]


def load_matrices(store: ArtifactStore, record: dict) -> dict:
    """A similarity record's matrices by metric, with ``fingerprints`` (their order)."""
    import numpy as np

    with np.load(store.local_path(MATRIX_KIND, record["matrix"]) / MATRIX_FILE) as z:
        return {k: z[k] for k in z.files}


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
    outputs=(MATRIX_KIND,),
)

compute_similarity = STAGE.task()
