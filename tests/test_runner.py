"""Scale-out: the recipe on a local Dask cluster of two worker processes gives the thread
runner's leaderboard and lineage, spreads evaluations over both workers, records where each
stage ran, and computes nothing on a rerun."""

from __future__ import annotations

import pytest

from tests.test_reliability import _board, _small_zoo, _start

pytestmark = [pytest.mark.slow]


def test_the_recipe_on_a_two_worker_dask_cluster(demo_zoo, tmp_path):
    import yaml

    from storage import LineageDB

    threads = _start(_small_zoo(demo_zoo, tmp_path, "threads"), tmp_path / "home")
    out = threads.communicate(timeout=900)[0]
    assert threads.returncode == 0, out[-3000:]

    config = _small_zoo(demo_zoo, tmp_path, "dask")
    data = yaml.safe_load(config.read_text())
    data["runner"] = {"kind": "dask", "n_workers": 2, "threads_per_worker": 1}
    config.write_text(yaml.safe_dump(data))
    first = _start(config, tmp_path / "home")
    out = first.communicate(timeout=900)[0]
    assert first.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]

    db_path = tmp_path / "dask" / "lineage.duckdb"
    assert _board(db_path) == _board(tmp_path / "threads" / "lineage.duckdb")
    db = LineageDB(str(db_path), read_only=True)
    workers = db.query(
        "SELECT count(DISTINCT worker) FROM runs WHERE stage = 'evaluate' AND status = 'completed'"
    ).item()
    assert workers >= 2
    placed = db.query(
        "SELECT host, worker, device FROM runs WHERE status = 'completed' AND stage = 'evaluate'"
    ).rows()
    assert all(h and w.startswith("tcp://") and d == "cpu" for h, w, d in placed), placed
    same_edges = "SELECT parent_name, role, child_name FROM v_lineage ORDER BY ALL"
    other = LineageDB(str(tmp_path / "threads" / "lineage.duckdb"), read_only=True)
    assert db.query(same_edges).rows() == other.query(same_edges).rows()

    # nothing changed: the rerun on the cluster computes nothing
    again = _start(config, tmp_path / "home")
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
