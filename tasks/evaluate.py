"""Stage 5: evaluate a model with lm-evaluation-harness on the configured tasks.

Keyed by the model's content fingerprint, the task list, the limit and a hash of the task
files themselves (YAML and data), so editing a benchmark re-evaluates every model on it
while renaming or moving a model does not.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from pathlib import Path

from model_glue.evaluate import DEMO_TASKS_DIR
from storage import ArtifactStore
from tasks._stage import Stage, load_record, save_record

EVAL_VERSION = "1"


def task_files_hash(include_paths: list[str]) -> str:
    """Hash of every file in the task folders (YAML, data, helpers)."""
    h = hashlib.sha256()
    for root in [DEMO_TASKS_DIR, *map(Path, include_paths)]:
        for f in sorted(Path(root).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:32]


STAGE = Stage(
    name="evaluate",
    code_version=f"evaluate-{EVAL_VERSION}-lm_eval-{version('lm-eval')}",
    # what changes the numbers: dtype and backend; not the device index or the batch size
    key_parts=lambda model, tasks, limit, batch_size, include_paths, device="cpu", dtype="float32", backend="hf", allow_code_execution=False: {
        "model": model["fingerprint"],
        "tasks": sorted(tasks),
        "limit": limit,
        "task_files": task_files_hash(include_paths),
        "numerics": [dtype, backend],
    },
)


def _evaluate(
    store_url: str,
    model: dict,
    tasks: list[str],
    limit: int | None,
    batch_size: int | str,
    include_paths: list[str],
    device: str = "cpu",
    dtype: str = "float32",
    backend: str = "hf",
    allow_code_execution: bool = False,
) -> dict:
    """``model``: a record with name, fingerprint, a local directory ``path`` and optionally
    ``loader: mixture`` for mixture directories."""
    store = ArtifactStore(store_url)
    key = STAGE.key(
        {
            "model": model,
            "tasks": tasks,
            "limit": limit,
            "batch_size": batch_size,
            "include_paths": include_paths,
            "device": device,
            "dtype": dtype,
            "backend": backend,
            "allow_code_execution": allow_code_execution,
        }
    )
    if (record := load_record(store, key)) is not None:
        return record
    from model_glue.evaluate import evaluate  # lm-eval and transformers: only when evaluating

    target = model["path"]
    # model-level and block-level mixtures go through our lm-eval model class
    if model.get("loader") == "mixture":
        from model_glue.mixture import MixtureLM

        target = MixtureLM(pretrained=model["path"], batch_size=batch_size)  # CPU, float32
    scores = evaluate(
        target,
        tasks,
        limit=limit,
        batch_size=batch_size,
        include_paths=include_paths,
        device=device,
        dtype=dtype,
        backend="hf" if model.get("loader") == "mixture" else backend,
        allow_code_execution=allow_code_execution,
    )
    record = {
        "fingerprint": model["fingerprint"],
        "tasks": sorted(tasks),
        "limit": limit,
        "scores": [
            {
                "task": s.task,
                "metric": s.metric,
                "value": s.value,
                "stderr": s.stderr,
                "n_samples": s.n_samples,
            }
            for s in scores
        ],
    }
    return save_record(store, key, record, STAGE.name)


evaluate_model = STAGE.task(_evaluate)
