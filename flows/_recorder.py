"""Runs stage calls from a flow and records each one in the lineage database.

The flow process is the single writer of the DuckDB file: tasks (possibly on other
workers) only return small records, and this recorder turns each call into a ``runs``
row (completed, cached, reused or failed) plus what the stage's ``lineage`` says it made
(artifacts, edges with roles, detail rows), all in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from prefect.exceptions import FailedRun
from prefect.futures import PrefectFuture
from prefect.states import State
from rich.console import Console
from rich.markup import escape

from storage import ArtifactStore, LineageDB
from tasks.stage import PLACED, RECORD_KIND, REUSED, Call, for_call

STYLES = {
    "completed": "green",
    "cached": "cyan",
    "reused": "blue",
    "failed": "bold red",
    "fresh": "cyan",
    "stale": "yellow",
}


@dataclass
class Outcome:
    label: str
    status: str  # completed | cached | reused | failed (plans: fresh | stale)
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


class StageRunner(Protocol):
    """What the recipe's steps need from whoever runs their calls: the :class:`Recorder`
    in a run, the planner (``flows.plan.Planner``) in ``glue plan``."""

    db: LineageDB | None  # what a run recorded (read after the recipe)
    flow_run_id: str | None
    failures: list[Failure]

    def say(self, line: str, style: str | None = None) -> None: ...

    def section(self, title: str) -> None: ...

    def waits(self, stage: str, label: str, on: str) -> None: ...

    def run(self, c: Call) -> Outcome: ...

    def run_many(self, calls: list[Call]) -> list[Outcome]: ...


@dataclass
class Recorder:
    db: LineageDB
    store_url: str
    flow_run_id: str
    console: Console = field(default_factory=Console)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    def say(self, line: str, style: str | None = None) -> None:
        text = escape(line) if style is None else f"[{style}]{escape(line)}[/]"
        self.console.print(f"  {text}", highlight=False, soft_wrap=True)
        run_log(line, logging.WARNING if style in ("yellow", "red") else logging.INFO)

    def section(self, title: str) -> None:
        self.console.rule(f"[bold]{title}")

    def waits(self, stage: str, label: str, on: str) -> None:
        """A call that cannot be made because ``on`` has no result (a plan lists it)."""

    def run(self, c: Call) -> Outcome:
        """Run one stage call now and record it; failures are returned, not raised."""
        return self.run_many([c])[0]

    def run_many(self, calls: list[Call]) -> list[Outcome]:
        """Submit calls concurrently (Prefect's task runner), then record them in order.

        A call whose ``device`` is a CUDA device asks a Dask runner for one ``GPU`` resource,
        so that two model-loading stages never share a GPU (workers started with
        ``--resources GPU=1``); other runners ignore the annotation."""
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        store = ArtifactStore(self.store_url)
        workers = _dask_workers()  # who may take them: named if they vanish
        futures: list[PrefectFuture] = []
        for c in calls:
            with _resources(c.params.get("device")):
                task = for_call(c, store).with_options(task_run_name=RunName(c))
                futures.append(task.submit(store_url=self.store_url, key=c.key, **c.params))
        lost = _wait(futures, workers)
        seconds = time.perf_counter() - t0
        with self.db.transaction():  # every run row with what it made, or none of them
            outcomes = [
                self._record(c, fut.state, started, seconds, store, lost.get(i))
                for i, (c, fut) in enumerate(zip(calls, futures, strict=True))
            ]
        for c, o in zip(calls, outcomes, strict=True):
            self._print(c, o)
        return outcomes

    def _record(
        self,
        c: Call,
        state: State,
        started: datetime,
        seconds: float,
        store: ArtifactStore,
        lost: str | None = None,
    ) -> Outcome:
        placed: dict = {}
        expected = False
        if lost is not None:  # Dask gave up on it: its task run never reported a state
            status, record, error = "failed", None, lost
            self.failures.append(Failure(c.stage.name, c.label, error, False))
        elif state.is_completed():
            record, error = state.result(), None
            reused = isinstance(record, dict) and record.pop(REUSED, False)
            placed = record.pop(PLACED, {}) if isinstance(record, dict) else {}
            if state.name == "Cached":
                status = "cached"
                placed = {}  # nothing ran: the placement is the original run's
            else:
                status = "reused" if reused else "completed"
        else:
            status, record = "failed", None
            try:
                state.result()
                error = state.message or state.name
            except FailedRun:  # a handled failure: the stage returned Failed(message=...)
                error, expected = state.message or state.name, True
            except BaseException as e:  # the task's own exception, re-raised by result()
                error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.failures.append(Failure(c.stage.name, c.label, error, expected))
        record = record if isinstance(record, dict) else None
        run_id = self.db.record_run(
            c.stage.name,
            status=status,
            started_at=started,
            finished_at=datetime.now(UTC),
            code_version=c.stage.code_version,
            cache_key=c.key,
            key_parts=None if c.identity is None else c.identity["in"],
            label=c.label,
            params=_small(c.params),
            inputs=_input_ids(c.params),
            outputs=[record["key"]] if record and "key" in record else None,
            error=error,
            flow_run_id=self.flow_run_id,
            host=placed.get("host"),
            worker=placed.get("worker"),
            device=placed.get("device"),
        )
        if record is not None:
            lineage = c.stage.lineage(c, record)
            lineage.artifacts = [  # a stage's own record: stored under its key
                a
                if a.uri or a.artifact_id != record.get("key")
                else replace(a, uri=store.uri(RECORD_KIND, a.artifact_id))
                for a in lineage.artifacts
            ]
            self.db.write(lineage, run_id)
        self.counts.setdefault(c.stage.name, {}).setdefault(status, 0)
        self.counts[c.stage.name][status] += 1
        return Outcome(c.label, status, seconds, record, error, run_id, expected)

    def _print(self, c: Call, o: Outcome) -> None:
        msg = f"  [{STYLES[o.status]}]{o.status:>9}[/] {c.stage.name:<11} {escape(c.label)}"
        if o.error is not None:  # one line: the traceback of an unexpected error is Prefect's
            msg += f": [red]{escape(o.error)}[/]"
        self.console.print(msg, highlight=False, soft_wrap=True)
        plain = f"{o.status} {c.stage.name} {c.label}" + (f": {o.error}" if o.error else "")
        run_log(plain, logging.ERROR if o.status == "failed" else logging.INFO)
        for line in c.stage.describe(o.record) if o.record is not None else ():
            self.say(line)


@dataclass(frozen=True)
class RunName:
    """A task run's name in Prefect's UI: the stage and what it computes
    (``evaluate · add-a``). A callable, so that braces in a label are not a template."""

    text: str

    def __init__(self, c: Call) -> None:
        object.__setattr__(self, "text", f"{c.stage.name} · {c.label}")

    def __call__(self) -> str:
        return self.text


_RUN_LOGGER = "model_glue.run"


def run_log(message: str, level: int = logging.INFO) -> None:
    """``message`` into the current flow run's logs in Prefect (its run page), not on the
    console: the console already has the line, and Prefect's own loggers are at WARNING.
    Outside a flow run (``glue plan``) this does nothing."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    logger = logging.getLogger(_RUN_LOGGER)
    if not logger.handlers:
        from prefect.logging.handlers import APILogHandler

        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logger.log(level, message)


def _dask_workers() -> list[str]:
    from flows.runners import dask_client

    client = dask_client()
    if client is None:
        return []
    try:
        return sorted(client.scheduler_info().get("workers", {}))
    except Exception:  # noqa: BLE001 - only used to name a worker in an error
        return []


def _wait(futures: list[PrefectFuture], workers: list[str] = ()) -> dict[int, str]:  # type: ignore[assignment]
    """Wait for every future. On Dask a stage can otherwise wait forever: a worker that
    cannot unpickle it (or runs out of memory) leaves, and the task goes to the next
    worker, or waits for one when none is left. Such a task is cancelled once it lost
    ``allowed-failures`` workers (distributed's own limit, which a worker that closes
    itself does not count against), or once the cluster has had no worker for
    ``NO_WORKER_SECONDS``: index -> the one line that says so, naming the worker.
    Elsewhere: Prefect's own wait."""
    from flows.runners import allowed_failures, cluster_watch, dask_client

    client = dask_client()
    wrapped = [getattr(f, "wrapped_future", None) for f in futures]
    if client is None or any(w is None for w in wrapped):
        for fut in futures:
            fut.wait()
        return {}
    allowed, lost = allowed_failures(), {}
    pending = dict(enumerate(wrapped))
    seen: dict[str, str] = {}  # key -> the last worker seen holding it
    known: list[str] = list(workers)
    empty_since = None
    while pending:
        try:  # back as soon as it is done; the cluster is only watched while waiting
            next(iter(pending.values())).result(timeout=POLL_SECONDS)
        except Exception:  # noqa: BLE001 - not done yet, or failed: its state says which
            pass
        pending = {i: w for i, w in pending.items() if not w.done()}
        if not pending:
            break
        try:
            workers, counts = cluster_watch(client, [w.key for w in pending.values()])
        except Exception:  # noqa: BLE001 - a scheduler that cannot answer: keep waiting
            workers, counts = known, {}
        known = workers or known
        empty_since = (empty_since or time.monotonic()) if not workers else None
        for i, w in list(pending.items()):
            n, where = counts.get(w.key, (0, ""))
            seen[w.key] = where or seen.get(w.key, "") or (known[-1] if known else "?")
            why = None
            if n >= allowed:
                why = f"lost the worker running it {n} times (last: {seen[w.key]})"
            elif empty_since is not None and time.monotonic() - empty_since > NO_WORKER_SECONDS:
                why = (
                    f"the cluster has had no worker for {NO_WORKER_SECONDS:.0f} s "
                    f"(worker {seen[w.key]} left)"
                )
            if why:
                w.cancel()
                lost[i] = (
                    f"DaskWorkerError: {why}; see that worker's log (a worker that cannot "
                    "import the stage's code closes; one out of memory dies)"
                )
                del pending[i]
    for i, fut in enumerate(futures):
        if i not in lost:
            fut.wait()
    return lost


NO_WORKER_SECONDS = 30.0
POLL_SECONDS = 2.0


def _resources(device: Any):
    """``dask.annotate(resources={"GPU": 1})`` for CUDA calls when Dask is importable."""
    if not (isinstance(device, str) and device.startswith("cuda")):
        return contextlib.nullcontext()
    try:
        import dask
    except ImportError:
        return contextlib.nullcontext()
    return dask.annotate(resources={"GPU": 1})


def _input_ids(params: dict) -> list[str]:
    """Content ids (artifact ids, fingerprints) found in the parameters: the run's inputs."""
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
