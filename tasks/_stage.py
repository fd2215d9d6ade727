"""What every pipeline stage shares: content-addressed keys and Prefect caching on them.

A stage's key is ``sha256(stage, code version, parameters, input fingerprints)``. It is
used three ways: as the Prefect cache key, as the store key of the stage's output
artifact, and as the ``cache_key`` of the stage's row in the lineage ``runs`` table.

Caching rule: Prefect reuses a result only while the stage's artifact is present and
complete in the store; :meth:`Stage.for_call` returns the task with ``refresh_cache`` when
it is not. Deleting an artifact therefore forces exactly that stage to run again, and the
record it produces is identical to the cached one because both derive from the same key.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.states import Failed

from model_glue.errors import InputError
from storage import ArtifactStore
from storage.locks import stage_lock
from tasks._quiet import quiet_handled_failures

# Every stage's record is stored as JSON under this artifact kind prefix.
RECORD_KIND = "record"
# Set on a record that a stage found in the store instead of computing it (never stored):
# the recorder counts such a run as 'reused' and removes the mark.
REUSED = "_reused"
# Set on every record a stage returns (never stored): where it ran (host, worker, device),
# which the recorder writes to the run's row and removes.
PLACED = "_placed"


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object with sorted keys (the content address of a stage run)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its name, code version, and how its key derives from its inputs.

    ``key_parts(**params)`` returns the JSON-able identity of one run of the stage (content
    fingerprints and parameters only, never paths); bump ``code_version`` whenever the
    stage's numerics change, because Prefect's TASK_SOURCE does not see helper functions.
    """

    name: str
    code_version: str
    key_parts: Callable[..., Any]

    def key(self, params: dict[str, Any]) -> str:
        args = {k: v for k, v in params.items() if k != "store_url"}
        return stable_hash(
            {"stage": self.name, "v": self.code_version, "in": self.key_parts(**args)}
        )

    def task(self, fn: Callable, **task_options: Any):
        """Wrap ``fn(store_url=..., **params) -> dict`` as a cached Prefect task.

        An :class:`~model_glue.errors.InputError` (a truncated checkpoint, an unknown task)
        ends the task in a handled ``Failed`` state whose message is the error's one line,
        so no traceback is logged for it; any other exception fails the task with its
        traceback, as Prefect does."""
        stage = self

        def cache_key_fn(_ctx, params: dict[str, Any]) -> str:
            return f"{stage.name}-{stage.key(params)}"

        options = {
            "name": self.name,
            "cache_key_fn": cache_key_fn,
            "persist_result": True,
            "result_serializer": "json",
            **task_options,
        }

        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            params = dict(bound.arguments)
            try:
                key = stage.key(params)
            except Exception:  # e.g. a missing model directory: the body reports it
                key = None
            quiet_handled_failures()  # also in Dask workers: one line per input error
            try:
                if key is None:
                    result = fn(*args, **kwargs)
                else:
                    # one computation per key across runs sharing the store: a second run
                    # waits here, then finds the first one's artifact and reuses it
                    with stage_lock(ArtifactStore(params["store_url"]), stage.name, key):
                        result = fn(*args, **kwargs)
            except InputError as e:
                return Failed(message=input_error_message(e))
            if isinstance(result, dict):
                result = {**result, PLACED: placement(params.get("device"))}
            return result

        wrapped = task(**options)(body)
        wrapped.stage = stage  # type: ignore[attr-defined]
        return wrapped


def placement(device: str | None = None) -> dict[str, str]:
    """Where this call runs: the host, the Dask worker's address (or ``pid:N`` outside
    Dask) and the device its models use."""
    import os
    import socket

    worker = f"pid:{os.getpid()}"
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        pass
    return {"host": socket.gethostname(), "worker": worker, "device": device or "cpu"}


def input_error_message(e: InputError) -> str:
    """The one line that reports an expected input error: ``CheckpointError: <message>``."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def for_call(task: Any, params: dict[str, Any], store: ArtifactStore) -> Any:
    """``task`` itself if its artifact for ``params`` is in the store, else a copy that
    ignores (and refreshes) Prefect's cached result: the store is the source of truth."""
    try:
        key = task.stage.key(params)
    except Exception:  # e.g. a missing model directory: let the task report it
        key = None
    if key is not None and store.exists(RECORD_KIND, key, verify="size"):
        return task
    return task.with_options(refresh_cache=True)


def load_record(store: ArtifactStore, key: str) -> dict | None:
    """The stage record already in the store for ``key``, if complete (a reuse, not a
    run), marked with ``REUSED``."""
    if store.exists(RECORD_KIND, key, verify="hash"):
        return {**store.get_json(RECORD_KIND, key), REUSED: True}
    return None


def save_record(store: ArtifactStore, key: str, record: dict, stage: str) -> dict:
    record = {**record, "key": key, "stage": stage}
    store.put_json(RECORD_KIND, key, record, meta={"stage": stage})
    return record
