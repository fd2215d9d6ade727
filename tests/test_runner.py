"""Scale-out: the recipe on a local Dask cluster of two worker processes gives the thread
runner's leaderboard and lineage, spreads evaluations over both workers, records where each
stage ran, and computes nothing on a rerun."""

from __future__ import annotations

import pytest

from tests.factories import latest_leaderboard, lineage, small_project, start_glue_run

pytestmark = [pytest.mark.slow]


def test_the_recipe_on_a_two_worker_dask_cluster(demo_zoo, tmp_path):
    import yaml

    threads = start_glue_run(
        small_project(demo_zoo / "models", tmp_path, "threads"), tmp_path / "home"
    )
    out = threads.communicate(timeout=900)[0]
    assert threads.returncode == 0, out[-3000:]

    config = small_project(demo_zoo / "models", tmp_path, "dask")
    data = yaml.safe_load(config.read_text())
    data["runner"] = {"kind": "dask", "n_workers": 2, "threads_per_worker": 1}
    config.write_text(yaml.safe_dump(data))
    first = start_glue_run(config, tmp_path / "home")
    out = first.communicate(timeout=900)[0]
    assert first.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]

    db_path = tmp_path / "dask" / "lineage.duckdb"
    assert latest_leaderboard(db_path) == latest_leaderboard(
        tmp_path / "threads" / "lineage.duckdb"
    )
    db = lineage(db_path)
    workers = db.query(
        "SELECT count(DISTINCT worker) FROM runs WHERE stage = 'evaluate' AND status = 'completed'"
    ).item()
    assert workers >= 2
    placed = db.query(
        "SELECT host, worker, device FROM runs WHERE status = 'completed' AND stage = 'evaluate'"
    ).rows()
    assert all(h and w.startswith("tcp://") and d == "cpu" for h, w, d in placed), placed
    same_edges = "SELECT parent_name, role, child_name FROM v_lineage ORDER BY ALL"
    other = lineage(tmp_path / "threads" / "lineage.duckdb")
    assert db.query(same_edges).rows() == other.query(same_edges).rows()

    # nothing changed: the rerun on the cluster computes nothing
    again = start_glue_run(config, tmp_path / "home")
    out = again.communicate(timeout=900)[0]
    assert again.returncode == 0, out[-3000:]
    latest = db.query("SELECT flow_run_id FROM flow_runs ORDER BY started_at DESC LIMIT 1").item()
    computed = db.query(
        "SELECT count(*) FROM runs WHERE flow_run_id = ? AND status = 'completed'", [latest]
    ).item()
    assert computed == 0


def test_a_store_that_workers_cannot_see_is_refused(tmp_path):
    """An existing cluster whose workers lack the store's folder: one clear error."""
    from distributed import LocalCluster

    from flows.runners import check_store_visible
    from model_glue.config import ConfigError

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        check_store_visible(cluster.scheduler_address, str(tmp_path))  # visible: fine
        with pytest.raises(ConfigError, match=r"store .*nowhere is not visible .* dask worker"):
            check_store_visible(cluster.scheduler_address, str(tmp_path / "nowhere"))
        with pytest.raises(ConfigError, match=r"hub_cache .*nowhere is not visible"):
            check_store_visible(cluster.scheduler_address, str(tmp_path / "nowhere"), "hub_cache")


def test_a_dask_worker_that_cannot_import_a_stage_fails_the_run_at_once(demo_zoo, tmp_path):
    """Workers whose ``tasks.stage`` cannot be imported (a preload blocks it, as a scratch
    folder shadowing a package does): the run fails in one line naming the worker, in
    bounded time, instead of handing the first stage to worker after worker."""
    import os
    import time

    import yaml

    config = small_project(demo_zoo / "models", tmp_path, "broken-worker")
    data = yaml.safe_load(config.read_text())
    data["runner"] = {"kind": "dask", "n_workers": 1, "threads_per_worker": 1}
    config.write_text(yaml.safe_dump(data))
    preload = tmp_path / "shadow.py"
    preload.write_text("import sys\nsys.modules['tasks.stage'] = None  # import now fails\n")
    os.environ["DASK_DISTRIBUTED__WORKER__PRELOAD"] = f'["{preload}"]'
    try:
        t0 = time.monotonic()
        proc = start_glue_run(config, tmp_path / "home")
        out = proc.communicate(timeout=300)[0]
        took = time.monotonic() - t0
    finally:
        del os.environ["DASK_DISTRIBUTED__WORKER__PRELOAD"]
    assert proc.returncode == 1, out[-3000:]
    line = [x for x in out.splitlines() if "cannot import tasks.stage" in x]
    assert line and "dask worker tcp://" in line[0], out[-3000:]
    assert took < 120, took
    print(f"failed after {took:.1f} s: {line[0]}")


def _unpicklable_here(pid: int):
    import os

    if os.getpid() != pid:
        raise ImportError("No module named 'storage.artifacts' (shadowed on this worker)")
    return _Poison(pid)


class _Poison:
    """Pickles in the flow's process; unpickling it anywhere else fails."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __reduce__(self):
        return (_unpicklable_here, (self.pid,))


def test_a_task_no_dask_worker_can_load_fails_its_stage_in_bounded_time(
    prefect_harness, monkeypatch
):
    """The worker that takes it closes; with no worker left the task would wait forever.
    The recorder's wait cancels it and says so, naming the worker."""
    import os
    import time

    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    import flows._recorder as recorder

    monkeypatch.setattr(recorder, "NO_WORKER_SECONDS", 5.0)

    @task
    def work(x):
        return 1

    runner = DaskTaskRunner(
        cluster_kwargs={
            "n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"
        }
    )  # fmt: skip

    @flow(task_runner=runner)
    def run() -> tuple[dict, float]:
        workers = recorder._dask_workers()
        t0 = time.monotonic()
        futures = [work.submit(_Poison(os.getpid()))]
        return recorder._wait(futures, workers), time.monotonic() - t0

    lost, took = run()
    assert list(lost) == [0]
    assert lost[0].startswith(
        "DaskWorkerError: the cluster has had no worker for 5 s (worker tcp://"
    )
    assert took < 60, took
