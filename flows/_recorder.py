"""Runs stage tasks from a flow and records each call in the lineage database.

The flow process is the single writer of the DuckDB file: tasks (possibly on other
workers) only return small records, and this recorder turns each call into a ``runs``
row (completed, cached, reused or failed), its edges and its outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect.exceptions import FailedRun
from prefect.futures import PrefectFuture
from prefect.states import State
from rich.console import Console
from rich.markup import escape

from storage import ArtifactStore, LineageDB
from tasks._stage import PLACED, REUSED, for_call


@dataclass
class Outcome:
    label: str
    status: str  # completed | cached | reused | failed
    seconds: float
    record: dict | None = None
    error: str | None = None  # one line: "CheckpointError: ..." (failed runs only)
    run_id: str | None = None
    expected: bool = False  # the error is an InputError (bad input), not a bug


@dataclass(frozen=True)
class Failure:
    stage: str
    label: str
    error: str
    expected: bool

    def __str__(self) -> str:
        return f"{self.stage} {self.label}: {self.error}"


@dataclass
class Recorder:
    db: LineageDB
    store_url: str
    flow_run_id: str
    console: Console = field(default_factory=Console)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    def run(self, task: Any, label: str, /, **params: Any) -> Outcome:
        """Run one stage task now and record it; failures are returned, not raised."""
        return self.run_many(task, [(label, params)])[0]

    def run_many(self, task: Any, calls: list[tuple[str, dict[str, Any]]]) -> list[Outcome]:
        """Submit calls concurrently (Prefect's task runner), then record them in order.

        A call whose ``device`` is a CUDA device asks a Dask runner for one ``GPU`` resource,
        so that two model-loading stages never share a GPU (workers started with
        ``--resources GPU=1``); other runners ignore the annotation."""
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        store = ArtifactStore(self.store_url)
        futures: list[PrefectFuture] = []
        for _, p in calls:
            with _resources(p.get("device")):
                futures.append(for_call(task, p, store).submit(store_url=self.store_url, **p))
        for fut in futures:
            fut.wait()
        with self.db.transaction():
            return [
                self._record(task, label, params, fut.state, started, time.perf_counter() - t0)
                for (label, params), fut in zip(calls, futures, strict=True)
            ]

    def _record(
        self, task: Any, label: str, params: dict, state: State, started: datetime, seconds: float
    ) -> Outcome:
        stage = task.stage
        try:
            key = stage.key(params)
        except Exception:  # e.g. a missing directory: the task itself reports it
            key = None
        placed: dict = {}
        if state.is_completed():
            record, error = state.result(), None
            reused = isinstance(record, dict) and record.pop(REUSED, False)
            placed = record.pop(PLACED, {}) if isinstance(record, dict) else {}
            if state.name == "Cached":
                status = "cached"
                placed = {}  # nothing ran: the placement is the original run's
            else:
                status = "reused" if reused else "completed"
        else:
            status, record, expected = "failed", None, False
            try:
                state.result()
                error = state.message or state.name
            except FailedRun:  # a handled failure: the stage returned Failed(message=...)
                error, expected = state.message or state.name, True
            except BaseException as e:  # the task's own exception, re-raised by result()
                error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.failures.append(Failure(stage.name, label, error, expected))
        run_id = self.db.record_run(
            stage.name,
            status=status,
            started_at=started,
            finished_at=datetime.now(UTC),
            code_version=stage.code_version,
            cache_key=key,
            params=_small(params),
            inputs=_input_ids(params),
            outputs=[record["key"]] if isinstance(record, dict) and "key" in record else None,
            error=error,
            flow_run_id=self.flow_run_id,
            host=placed.get("host"),
            worker=placed.get("worker"),
            device=placed.get("device"),
        )
        self.counts.setdefault(stage.name, {}).setdefault(status, 0)
        self.counts[stage.name][status] += 1
        style = {"completed": "green", "cached": "cyan", "reused": "blue", "failed": "bold red"}[
            status
        ]
        msg = f"  [{style}]{status:>9}[/] {stage.name:<11} {escape(label)}"
        if error is not None:  # one line: the traceback of an unexpected error is Prefect's
            msg += f": [red]{escape(error)}[/]"
        self.console.print(msg, highlight=False, soft_wrap=True)
        return Outcome(
            label,
            status,
            seconds,
            record if isinstance(record, dict) else None,
            error,
            run_id,
            status == "failed" and expected,
        )


def _resources(device: Any):
    """``dask.annotate(resources={"GPU": 1})`` for CUDA calls when Dask is importable."""
    import contextlib

    if not (isinstance(device, str) and device.startswith("cuda")):
        return contextlib.nullcontext()
    try:
        import dask
    except ImportError:
        return contextlib.nullcontext()
    return dask.annotate(resources={"GPU": 1})


def _input_ids(params: dict) -> list[str]:
    """Content ids (fingerprints, artifact ids) found in the parameters: the run's inputs."""
    ids: list[str] = []

    def visit(v: Any) -> None:
        if isinstance(v, dict):
            for k in ("artifact_id", "fingerprint"):
                if isinstance(v.get(k), str):
                    ids.append(v[k])
                    return
            for x in v.values():
                visit(x)
        elif isinstance(v, list | tuple):
            for x in v:
                visit(x)

    visit(params)
    return sorted(set(ids))


def _small(params: dict) -> dict:
    """Parameters without bulky nested records (those are referenced by their ids)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict | list) and _input_ids({k: v}):
            out[k] = _input_ids({k: v})
        else:
            out[k] = v
    return out
