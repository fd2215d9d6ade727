"""Faults a nightly run meets: hostile SQL, non-finite weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.factories import (
    GLUE,
    latest_leaderboard,
    lineage,
    small_project,
    start_glue_run,
    write_config,
    zoo_entries,
)


def _glue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GLUE, *args], capture_output=True, text=True, timeout=300)


def test_glue_sql_reads_the_lineage_database_only(tmp_path):
    from storage import LineageDB

    db = tmp_path / "lineage.duckdb"
    LineageDB(db).start_flow_run("f1", flow="model-glue-recipe")
    secret = tmp_path / "secret.csv"
    secret.write_text("user,password\nroot,hunter2\n")
    ok = _glue("sql", "SELECT flow_run_id FROM flow_runs", "--db", str(db))
    assert ok.returncode == 0 and "f1" in ok.stdout
    for query in (f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM glob('{tmp_path}/*')"):
        refused = _glue("sql", query, "--db", str(db))
        assert refused.returncode == 2, refused.stdout
        assert "file system operations are disabled" in " ".join(refused.stderr.split())
        assert "hunter2" not in refused.stdout and "secret.csv" not in refused.stdout
    allowed = _glue("sql", f"SELECT * FROM read_csv('{secret}')", "--db", str(db), "--allow-files")
    assert allowed.returncode == 0 and "hunter2" in allowed.stdout
    refused = _glue("sql", "CREATE TABLE x (a INT)", "--db", str(db))
    assert refused.returncode == 2


def _poison(src: Path, dst: Path) -> str:
    """A copy of ``src`` with one NaN and one Inf in one weight; returns that tensor's name."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    sd[name][0, 0] = float("nan")
    sd[name][3, 2] = float("inf")
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return name


def test_non_finite_weights_are_found_by_the_fingerprint(tiny_llama, tmp_path):
    from model_glue.fingerprint import fingerprint_checkpoint

    model = tiny_llama("m")
    clean = fingerprint_checkpoint(str(model))
    assert clean.nonfinite == ()
    name = _poison(model, tmp_path / "bad")
    fp = fingerprint_checkpoint(str(tmp_path / "bad"))
    assert fp.nonfinite == (name,)


@pytest.mark.slow
def test_a_model_with_nan_weights_is_left_out_with_one_line(demo_zoo, prefect_harness, tmp_path):
    from flows.glue_recipe import run_config

    models = demo_zoo / "models"
    tensor = _poison(models / "add-a2", tmp_path / "poisoned")
    zoo = zoo_entries(models, {"base-a": ["add-a"]})
    zoo.append({"name": "poisoned", "path": str(tmp_path / "poisoned"), "base": "base-a"})
    evaluation = {"tasks": ["demo_add"], "limit": 5}
    path = write_config(tmp_path / "glue.yaml", zoo, evaluation=evaluation)
    summary = run_config(path)
    assert list(summary["excluded"]) == ["poisoned"]
    why = summary["excluded"]["poisoned"]
    assert tensor in why and "NaN or Inf" in why and "\n" not in why
    assert summary["clusters"] == [["add-a", "base-a"]]  # clustering never saw the NaN
    # opted in, it is kept; its NaN similarities never link it to anything
    write_config(path, zoo, evaluation=evaluation, allow_nonfinite=True)
    kept = run_config(path)
    assert kept["excluded"] == {} and "poisoned" in kept["models"]
    assert ["poisoned"] in kept["clusters"]


@pytest.mark.slow
def test_two_concurrent_runs_compute_nothing_twice(demo_zoo, tmp_path):
    config = small_project(demo_zoo / "models", tmp_path, "shared")
    first = start_glue_run(config, tmp_path / "home")
    time.sleep(3)
    second = start_glue_run(config, tmp_path / "home")
    outs = [p.communicate(timeout=900)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outs[1][-3000:]
    db = lineage(tmp_path / "shared" / "lineage.duckdb")
    twice = db.query(
        "SELECT stage, cache_key, count(*) AS n FROM runs WHERE status = 'completed' "
        "GROUP BY stage, cache_key HAVING count(*) > 1"
    )
    assert twice.height == 0, twice.to_dicts()
    per_run = db.query(
        "SELECT flow_run_id, count(*) FILTER (WHERE status = 'completed') AS computed, "
        "count(*) FILTER (WHERE status IN ('cached', 'reused')) AS reused FROM runs "
        "GROUP BY flow_run_id ORDER BY computed DESC"
    ).rows()
    assert len(per_run) == 2 and per_run[0][1] > 0 and per_run[1][2] > 0, per_run
    assert db.query("SELECT count(*) FROM runs WHERE status = 'failed'").item() == 0


@pytest.mark.slow
def test_a_killed_run_reruns_to_the_same_leaderboard(demo_zoo, tmp_path):
    import signal

    from storage import LineageDB

    clean = start_glue_run(small_project(demo_zoo / "models", tmp_path, "clean"), tmp_path / "home")
    assert clean.wait(timeout=900) == 0, clean.stdout.read()[-3000:]
    config = small_project(demo_zoo / "models", tmp_path, "killed")
    victim = start_glue_run(config, tmp_path / "home-killed")
    db_path = tmp_path / "killed" / "lineage.duckdb"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it in the middle: after the first searches
        time.sleep(1)
        try:
            n = (
                LineageDB(str(db_path), read_only=True, lock_timeout_s=1)
                .query("SELECT count(*) FROM runs WHERE stage = 'filter'")
                .item()
            )
        except Exception:
            continue
        if n >= 1:
            break
    assert victim.poll() is None, "the run ended before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    rerun = start_glue_run(config, tmp_path / "home-killed")
    out = rerun.communicate(timeout=900)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert latest_leaderboard(db_path) == latest_leaderboard(tmp_path / "clean" / "lineage.duckdb")
    leftovers = [p for p in (tmp_path / "killed" / "store").rglob("*") if ".tmp" in p.parts]
    assert all(p.is_dir() for p in leftovers), leftovers  # no half-written file left


def test_a_full_disk_fails_the_merge_in_one_line_and_commits_nothing(
    tiny_llama, tmp_path, monkeypatch
):
    """The store's filesystem runs out of space in the middle of writing a merged model's
    shard: the stage fails with one line naming the store, and neither a model nor a
    staging directory is left behind; a record write that meets a read-only store too."""
    import errno

    from model_glue.merge import io
    from storage import ArtifactStore, StoreWriteError
    from tasks.fingerprint import fingerprint_model
    from tasks.merge import merge_cluster

    store_url = str(tmp_path / "store")
    members = [
        fingerprint_model.fn(store_url=store_url, name=n, uri=str(tiny_llama(n, seed=i)))
        for i, n in enumerate(("a", "b"))
    ]
    written = []
    real_write = io.ShardedWriter.write

    def write(self, name, tensor):
        if written:  # the first tensor fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device", str(self.out_dir / "x"))
        written.append(name)
        return real_write(self, name, tensor)

    monkeypatch.setattr(io.ShardedWriter, "write", write)
    state = merge_cluster.fn(
        store_url=store_url, label="m", members=members, method="linear", params={}
    )
    assert state.is_failed()
    assert state.message.startswith(f"StoreWriteError: store {store_url}: No space left on device")
    assert "\n" not in state.message
    store = ArtifactStore(store_url)
    assert store.list("model") == []
    assert not any((Path(store_url) / ".tmp").iterdir())

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(
        StoreWriteError, match=r"store .*: Read-only file system while writing record/"
    ):
        store.put_json("record", "ab" * 16, {"x": 1})
    assert ("record", "ab" * 16) not in store.list("record")
    assert not any((Path(store_url) / ".tmp").iterdir())
