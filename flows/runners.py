"""The task runner a run uses, from its config: threads (default) or a Dask cluster.

``runner: {kind: dask, address: tcp://scheduler:8786}`` sends every stage to an existing
cluster; ``runner: {kind: dask, n_workers: 2, threads_per_worker: 1}`` starts a local one
for the run (``gpus_per_worker`` gives its workers a ``GPU`` resource). The flow process
stays the single DuckDB writer: stages return small records, which it records.
"""

from __future__ import annotations

from typing import Any

from model_glue.config import ConfigError, RunnerSettings


def task_runner(settings: RunnerSettings, kind: str | None = None) -> Any | None:
    """A Prefect task runner for ``settings`` (``kind`` overrides its kind); None: the
    flow's default thread pool."""
    kind = kind or settings.kind
    if kind == "threads":
        return None
    if kind != "dask":
        raise ConfigError(f"runner.kind: unknown runner {kind!r} (allowed: threads, dask)")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "runner.kind: dask needs prefect-dask (pip install prefect-dask)"
        ) from None
    _quiet_dask()
    if settings.address:
        return DaskTaskRunner(address=settings.address)
    _project_on_worker_path()
    cluster: dict[str, Any] = {
        "n_workers": settings.n_workers,
        "threads_per_worker": settings.threads_per_worker,
        "processes": True,
        "dashboard_address": ":0",  # a free port: runs never collide on 8787
        **_worker_preload(),
    }
    if settings.gpus_per_worker:
        cluster["resources"] = {"GPU": settings.gpus_per_worker}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)


def check_store_visible(address: str, store_url: str, what: str = "store") -> None:
    """Every worker of the cluster at ``address`` sees the store's folder (a local path
    must be on a filesystem all workers mount; ``what``: the folder's name in the error,
    e.g. hub_cache). Raises ConfigError naming a worker that does not."""
    import os

    from distributed import Client

    if "://" in store_url and not store_url.startswith("file://"):
        return  # an object store: every worker reaches it by URL
    root = os.path.abspath(store_url.removeprefix("file://"))

    def probe(root: str = root) -> tuple[str, bool]:
        import socket

        return socket.gethostname(), os.path.isdir(root) and os.access(root, os.W_OK)

    with Client(address, timeout=30) as client:
        for worker, (host, ok) in client.run(probe).items():
            if not ok:
                raise ConfigError(
                    f"{what} {root} is not visible (or not writable) from dask worker {worker} "
                    f"on {host}: put it on a filesystem every worker mounts, or use a URL "
                    "(s3://...) every worker can reach"
                )


def _quiet_dask() -> None:
    """Dask's INFO lines (scheduler start, worker registration) stay out of the run's
    output, in this process and in the worker processes it starts (they read DASK_*)."""
    import logging
    import os

    os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)


def _worker_preload() -> dict[str, list[str]]:
    """Local workers load ``dask_worker_preload.py`` (by path): distributed's shutdown
    heartbeat error as one line. A preload the user configured is kept instead."""
    from pathlib import Path

    import dask

    if dask.config.get("distributed.worker.preload", None):
        return {}
    return {"preload": [str(Path(__file__).with_name("dask_worker_preload.py"))]}


def _project_on_worker_path() -> None:
    """Local workers put their scratch folder first on ``sys.path``, and it holds a
    ``storage`` folder (Dask's spill space) that shadows this project's ``storage``
    package under an editable install. The project's root on ``PYTHONPATH``, which the
    worker processes inherit, puts the real package back in front of that namespace
    folder; spawned workers start from this process's ``sys.path``, which gets it too.
    (An ordinary install needs nothing: a regular package always wins.)"""
    import os
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if not (Path(root) / "storage" / "__init__.py").is_file():
        return
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    if root not in sys.path:  # spawned workers start from this process's sys.path
        sys.path.append(root)


# the modules a worker imports to run any stage (its tasks are pickled by reference)
STAGE_MODULES = (
    "tasks.stage",
    "tasks.fingerprint",
    "tasks.adapter",
    "tasks.discover",
    "tasks.similarity",
    "tasks.cluster",
    "tasks.filter",
    "tasks.merge",
    "tasks.mixture",
    "tasks.evaluate",
    "tasks.select",
)


def dask_client() -> Any | None:
    """The distributed client of the current flow run's Dask task runner, if any (the
    runner starts its cluster on first use)."""
    from prefect.context import FlowRunContext

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    if type(runner).__name__ != "DaskTaskRunner":
        return None
    return runner.client


def check_workers_import(client: Any) -> None:
    """Every worker imports the stage modules, or a ConfigError names the worker and the
    error: a worker that cannot unpickle a stage's task would otherwise take it, close,
    and be given it again forever (a scratch folder that shadows ``storage``, an older
    checkout on a remote machine)."""
    import importlib

    for name in STAGE_MODULES:
        answers = client.run(importlib.import_module, name, on_error="return")
        for worker, answer in sorted(answers.items()):
            if isinstance(answer, BaseException):
                raise ConfigError(
                    f"dask worker {worker} cannot import {name} "
                    f"({type(answer).__name__}: {answer}); it would never run a stage"
                )


def cluster_watch(client: Any, keys: list[str]) -> tuple[list[str], dict[str, tuple[int, str]]]:
    """The scheduler's workers, and for each task key how many times it lost the worker
    processing it (taken back for any reason but work stealing) and the worker that has
    it now ("" when none)."""

    def look(dask_scheduler, keys=keys):  # runs in the scheduler: pickled by value
        out = {}
        back = ("released", "waiting", "queued", "no-worker")
        for key in keys:
            lost = [
                s for s in dask_scheduler.story(key)  # (key, start, finish, recs, stimulus, t)
                if len(s) > 4 and s[1] == "processing" and s[2] in back
                and not str(s[4]).startswith("steal")
            ]  # fmt: skip
            ts = dask_scheduler.tasks.get(key)
            where = ts.processing_on.address if ts is not None and ts.processing_on else ""
            out[key] = (len(lost), where)
        return list(dask_scheduler.workers), out

    return client.run_on_scheduler(look)


def allowed_failures() -> int:
    """distributed's ``scheduler.allowed-failures``: how often a task may lose its worker."""
    import dask

    return int(dask.config.get("distributed.scheduler.allowed-failures", 3))
