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
    }
    if settings.gpus_per_worker:
        cluster["resources"] = {"GPU": settings.gpus_per_worker}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)


def check_store_visible(address: str, store_url: str) -> None:
    """Every worker of the cluster at ``address`` sees the store's folder (a local path
    must be on a filesystem all workers mount). Raises ConfigError naming a worker that
    does not."""
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
                    f"store {root} is not visible (or not writable) from dask worker {worker} "
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
