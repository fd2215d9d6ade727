"""Stage 5: evaluate a model with lm-evaluation-harness on the configured tasks.

Keyed by the model's content fingerprint, the task list, the limit, the split (``test``:
what the leaderboard reports; ``proxy``: what selection reads, with per-document values)
and a hash of the task files themselves (YAML and data), so editing a benchmark
re-evaluates every model on it while renaming or moving a model does not.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from model_glue.evaluate import DEMO_TASKS_DIR
from storage import Artifact, ArtifactStore, Details, Lineage
from tasks.stage import Call, Stage
from tasks.versions import EVALUATION


def task_files_hash(include_paths: list[str]) -> str:
    """Hash of every file in the task folders (YAML, data, helpers); the files are read
    again only when one of them was touched (their stat signature is the cache key)."""
    files = []
    for root in [DEMO_TASKS_DIR, *map(Path, include_paths)]:
        for f in sorted(Path(root).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                st = f.stat()
                files.append((str(f), st.st_size, st.st_mtime_ns))
    return _hash_files(tuple(files))


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _, _ in files:
        f = Path(path)
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:32]


def _evaluate(
    store: ArtifactStore,
    key: str,
    model: dict,
    tasks: list[str],
    limit: int | None,
    batch_size: int | str,
    include_paths: list[str],
    device: str = "cpu",
    dtype: str = "float32",
    backend: str = "hf",
    allow_code_execution: bool = False,
    split: str = "test",
) -> dict:
    """``model``: a ref with name, fingerprint, a local directory ``uri`` and optionally
    ``loader: mixture`` for mixture directories. ``split``: ``test`` (the leaderboard) or
    ``proxy`` (selection: the record keeps every document's values and context too)."""
    # lm-eval and transformers: only when evaluating
    from model_glue.evaluate import evaluate_samples

    target = model["uri"]
    # model-level and block-level mixtures go through our lm-eval model class
    if model.get("loader") == "mixture":
        from model_glue.mixture import MixtureLM

        target = MixtureLM(
            pretrained=model["uri"], batch_size=batch_size, device=device, dtype=dtype
        )
    scores, samples = evaluate_samples(
        target,
        tasks,
        limit=limit,
        batch_size=batch_size,
        include_paths=include_paths,
        device=device,
        dtype=dtype,
        backend="hf" if model.get("loader") == "mixture" else backend,
        allow_code_execution=allow_code_execution,
        split=split,  # type: ignore[arg-type]
        log_samples=split == "proxy",
    )
    return {
        "fingerprint": model["fingerprint"],
        "tasks": sorted(tasks),
        "limit": limit,
        "split": split,
        "scores": [
            {
                "task": s.task,
                "metric": s.metric,
                "value": s.value,
                "stderr": s.stderr,
                "n_samples": s.n_samples,
                "split": s.split,
            }
            for s in scores
        ],
        "samples": samples,
    }


def _lineage(call: Call, r: dict) -> Lineage:
    model = call.params["model"]
    proxy = r.get("split") == "proxy"
    rows = [{k: v for k, v in sc.items() if not (proxy and k == "stderr")} for sc in r["scores"]]
    return Lineage(
        artifacts=[
            Artifact(
                r["key"],
                kind="evaluation",
                name=f"{'proxy-eval' if proxy else 'eval'}:{model['name']}",
                stage="evaluate",
                parents=((model["artifact_id"], "input"),),
            )
        ],
        # scores are per run: a cached evaluation scores the model again for this flow run;
        # proxy scores (what selection read) stay out of the leaderboard
        details=[
            Details(
                "proxy_scores" if proxy else "scores",
                rows,
                {"artifact_id": model["artifact_id"], "eval_limit": r["limit"]},
            )
        ],
    )


STAGE = Stage(
    name="evaluate",
    compute=_evaluate,
    uses=EVALUATION,
    not_in_key={
        "batch_size": "lm-eval's scores do not depend on it",
        "device": "where it runs; the dtype and backend are keyed",
        "allow_code_execution": "a permission: a task that needs it fails without it",
    },
    key_parts=lambda a: {
        "model": a["model"]["fingerprint"],
        "tasks": sorted(a["tasks"]),
        "include_paths": task_files_hash(a["include_paths"]),
    },
    lineage=_lineage,
    pending=lambda c: {"scores": [], "samples": []},
)

evaluate_model = STAGE.task()
