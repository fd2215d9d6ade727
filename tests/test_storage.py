"""Tests of storage/: the content-addressed artifact store and the lineage database."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import fsspec
import polars as pl
import pytest

from model_glue.env import configure_environment
from storage import (
    Artifact,
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ArtifactStore,
    Details,
    InvalidKeyError,
    Lineage,
    LineageDB,
    LineageError,
    LineageLockedError,
    ReadOnlyQueryError,
    StoreError,
)
from storage.manifest import MANIFEST_NAME

configure_environment()
REPO = Path(__file__).resolve().parents[1]
KEY = "ab" * 16
KEY2 = "cd" * 16


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _fill(d: Path, weights: bytes = b"\x01\x02\x03" * 1000) -> None:
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "shards").mkdir()
    (d / "shards" / "weights.bin").write_bytes(weights)


# ---- ArtifactStore ------------------------------------------------------------------------


def test_written_artifact_is_found_with_exact_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    assert not store.exists("merged", KEY)
    with store.writing("merged", KEY, meta={"method": "ties"}) as d:
        _fill(d)
    weights = b"\x01\x02\x03" * 1000
    m = store.manifest("merged", KEY)
    assert [(e.name, e.size) for e in m.files] == [
        ("config.json", 18),
        ("shards/weights.bin", 3000),
    ]
    assert m.file("shards/weights.bin").sha256 == hashlib.sha256(weights).hexdigest()
    by_hand = hashlib.sha256()
    for e in m.files:  # sorted by name
        by_hand.update(
            f"{e.name}\0{hashlib.sha256((tmp_path / 'store' / 'merged' / KEY / e.name).read_bytes()).hexdigest()}\n".encode()
        )
    assert m.content_hash == by_hand.hexdigest()
    assert m.meta == {"method": "ties"}
    assert store.exists("merged", KEY, verify="hash")
    assert store.uri("merged", KEY) == str(tmp_path / "store" / "merged" / KEY)
    assert store.local_path("merged", KEY) == tmp_path / "store" / "merged" / KEY
    assert store.list() == [("merged", KEY)]
    assert store.list("similarity") == []
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def test_same_content_gives_same_content_hash_whatever_the_meta(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put_json("assignments", KEY, {"a": 0, "b": 1}, meta={"run": 1})
    store.put_json("assignments", KEY2, {"b": 1, "a": 0}, meta={"run": 2})
    assert (
        store.manifest("assignments", KEY).content_hash
        == store.manifest("assignments", KEY2).content_hash
    )
    assert store.get_json("assignments", KEY2) == {"a": 0, "b": 1}


def test_corruption_after_commit_is_detected_naming_the_file(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.writing("merged", KEY) as d:
        _fill(d)
    weights = tmp_path / "merged" / KEY / "shards" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[1234] ^= 0xFF  # same size, different bytes: only a hash check can see it
    weights.write_bytes(bytes(data))
    assert store.exists("merged", KEY, verify="size")
    assert not store.exists("merged", KEY, verify="hash")
    with pytest.raises(ArtifactCorruptError, match="shards/weights.bin") as err:
        store.verify("merged", KEY)
    assert err.value.file == "shards/weights.bin"

    weights.write_bytes(bytes(data[:100]))  # truncated
    assert not store.exists("merged", KEY, verify="size")
    with pytest.raises(
        ArtifactCorruptError, match=r"shards/weights.bin: size 100 bytes, manifest says 3000"
    ):
        store.verify("merged", KEY, full=False)

    weights.write_bytes(b"\x01\x02\x03" * 1000)
    (tmp_path / "merged" / KEY / "stray.txt").write_text("x")
    with pytest.raises(ArtifactCorruptError, match="stray.txt: file not listed"):
        store.verify("merged", KEY, full=False)


def test_rewriting_a_corrupt_artifact_replaces_it(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.writing("merged", KEY) as d:
        _fill(d)
    (tmp_path / "merged" / KEY / "config.json").write_text('{"hidden_size": 9}')
    assert not store.exists("merged", KEY, verify="hash")
    with store.writing("merged", KEY) as d:
        _fill(d)
    assert store.exists("merged", KEY, verify="hash")
    assert (tmp_path / "merged" / KEY / "config.json").read_text() == '{"hidden_size": 8}'
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_exception_inside_writing_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError, match="merge failed"):
        with store.writing("merged", KEY) as d:
            _fill(d)
            raise RuntimeError("merge failed")
    assert not (tmp_path / "merged" / KEY).exists()
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert store.list() == []
    with pytest.raises(ArtifactNotFoundError, match=f"merged/{KEY}"):
        store.manifest("merged", KEY)


def test_empty_artifact_and_bad_meta_are_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(StoreError, match="nothing was written"):
        with store.writing("merged", KEY):
            pass
    with pytest.raises(StoreError, match="meta is not JSON"):
        with store.writing("merged", KEY, meta={"when": object()}):
            pass
    assert store.list() == [] and list((tmp_path / ".tmp").iterdir()) == []


def test_concurrent_writers_of_one_key_leave_one_complete_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    both_staging = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            with store.writing("merged", KEY, meta={"writer": i}) as d:
                _fill(d)
                both_staging.wait(timeout=30)  # both have written before either commits
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.list() == [("merged", KEY)]
    m = store.verify("merged", KEY, full=True)
    assert m.meta["writer"] in (0, 1)
    assert sorted(os.listdir(tmp_path / "merged" / KEY)) == [MANIFEST_NAME, "config.json", "shards"]
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_memory_store_round_trip_and_local_copy(tmp_path: Path) -> None:
    url = f"memory://glue-test-{uuid.uuid4().hex}"
    store = ArtifactStore(url, cache_dir=tmp_path / "cache")
    try:
        uri = store.put_json("similarity", KEY, {"sim_all": 0.93}, meta={"tensor_set": "attn+mlp"})
        assert uri == f"{url.replace('memory://', 'memory:///')}/similarity/{KEY}"
        assert store.get_json("similarity", KEY) == {"sim_all": 0.93}
        with store.writing("merged", KEY2) as d:
            _fill(d)
        assert store.list() == [("merged", KEY2), ("similarity", KEY)]
        assert store.exists("merged", KEY2, verify="hash")
        local = store.local_path("merged", KEY2)
        assert local.parent.parent == tmp_path / "cache"
        assert (local / "shards" / "weights.bin").read_bytes() == b"\x01\x02\x03" * 1000
        assert store.local_path("merged", KEY2) == local  # second call reuses the verified copy

        # an upload killed before its manifest: invisible, then swept
        fs = store.fs
        fs.pipe_file(f"{store.root}/merged/{KEY}/config.json", b"{}")
        assert not store.exists("merged", KEY, verify="none")
        assert store.list("merged") == [("merged", KEY2)]
        assert store.sweep_tmp(older_than_s=0) == 1
        assert not fs.exists(f"{store.root}/merged/{KEY}")
        assert store.exists("merged", KEY2)

        fs.pipe_file(f"{store.root}/merged/{KEY2}/config.json", b'{"hidden_size": 7}')
        with pytest.raises(ArtifactCorruptError, match="config.json: sha256"):
            store.verify("merged", KEY2)
        fs.pipe_file(f"{store.root}/merged/{KEY2}/stray.bin", b"left by a killed upload")
        with store.writing("merged", KEY2) as d:  # rewriting replaces the damaged artifact
            _fill(d)
        assert store.exists("merged", KEY2, verify="hash")
        assert fs.cat_file(f"{store.root}/merged/{KEY2}/config.json") == b'{"hidden_size": 8}'
        assert not fs.exists(f"{store.root}/merged/{KEY2}/stray.bin")
    finally:
        fsspec.filesystem("memory").rm(store.root, recursive=True)


@pytest.mark.parametrize(
    "key", ["../../etc", "ab/cd1234", "abc", "ABCDEF0123", "", "zz" * 8, "ab" * 8 + ".."]
)
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(InvalidKeyError, match="invalid artifact key"):
        store.uri("merged", key)
    with pytest.raises(InvalidKeyError):
        with store.writing("merged", key):
            pass


@pytest.mark.parametrize("kind", [".tmp", "../x", "Merged", "a/b", ""])
def test_bad_kinds_are_refused(tmp_path: Path, kind: str) -> None:
    with pytest.raises(InvalidKeyError, match="invalid artifact kind"):
        ArtifactStore(tmp_path).exists(kind, KEY)


def test_sweep_tmp_removes_dead_writers_only(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    dead = tmp_path / ".tmp" / f"merged-{KEY[:16]}-otherhost-12345-deadbeef"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 10)
    old = time.time() - 7200
    os.utime(dead / "model.safetensors", (old, old))
    os.utime(dead, (old, old))
    fresh = tmp_path / ".tmp" / f"merged-{KEY2[:16]}-otherhost-12346-feedbeef"
    fresh.mkdir()
    # a writer of this host that was killed a moment ago: its pid is gone, so at once
    import subprocess
    import sys

    from storage.commit import host as _host

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    killed = tmp_path / ".tmp" / f"record-{KEY2[:16]}-{_host()}-{gone}-0badf00d"
    killed.mkdir()
    (killed / "data.json").write_text('{"half": ')
    with store.writing("merged", KEY) as d:  # a live writer of this process
        _fill(d)
        os.utime(d, (old, old))
        assert store.sweep_tmp(older_than_s=3600) == 2
        assert d.exists()
    assert not dead.exists() and not killed.exists() and fresh.exists()
    assert store.exists("merged", KEY, verify="hash")


# ---- LineageDB ----------------------------------------------------------------------------


T0 = datetime(2024, 5, 1, 12, 0, 0)


def _write(db: LineageDB, stage: str, lineage: Lineage, status: str = "completed", **run) -> str:
    """A stage run as the flow's recorder writes it (flows/_recorder.py): its ``runs`` row,
    then what the stage's lineage says it made, in one transaction; returns the run id."""
    with db.transaction():
        run_id = db.record_run(
            stage,
            status=status,
            started_at=run.pop("started_at", T0),
            finished_at=run.pop("finished_at", T0),
            outputs=run.pop("outputs", [a.artifact_id for a in lineage.artifacts]),
            **run,
        )
        db.write(lineage, run_id)
    return run_id


def _merged(artifact_id: str, name: str | None = None, **fields) -> Lineage:
    return Lineage([Artifact(artifact_id, kind="merged", name=name, stage="merge", **fields)])


def _dag(db: LineageDB) -> dict[str, str]:
    """Zoo models a, b, c; m1 = merge(a, b); m2 = merge(m1, c); x = mixture(m2, b); d unrelated."""
    ids = {n: _key(n) for n in ["a", "b", "c", "d", "m1", "m2", "x"]}
    with db.transaction():
        _record_dag(db, ids)
    return ids


def _record_dag(db: LineageDB, ids: dict[str, str]) -> None:
    zoo = [
        {
            "fingerprint": ids[n],
            "name": f"zoo/{n}",
            "uri": f"/zoo/{n}",
            "architecture": "LlamaForCausalLM",
            "param_count": 1000,
        }
        for n in "abcd"
    ]
    _write(db, "fingerprint", Lineage(models=zoo))
    inputs = lambda *names: tuple((ids[n], "input") for n in names)  # noqa: E731
    run = _write(db, "merge", _merged(ids["m1"], "cluster0-merge", parents=inputs("a", "b")))
    # a cache hit records the artifact again: it keeps its producing run and name
    _write(db, "merge", _merged(ids["m1"], parents=inputs("a")), status="cached")
    assert db.query("SELECT run_id, name FROM artifacts WHERE artifact_id = ?", [ids["m1"]]).row(
        0
    ) == (run, "cluster0-merge")
    _write(db, "merge", _merged(ids["m2"], "cluster0-merge-2", parents=inputs("m1", "c")))
    experts = ((ids["m2"], "expert"), (ids["b"], "expert"))
    mixture = Artifact(ids["x"], kind="mixture", name="final", stage="mixture", parents=experts)
    _write(db, "mixture", Lineage([mixture]))


def test_schema_creation_is_idempotent_and_migrates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import storage.db as lineage

    current = lineage.SCHEMA_VERSION
    path = tmp_path / "lineage.duckdb"
    db = LineageDB(path)
    db.write(_merged(KEY, "m"), None)
    again = LineageDB(path)
    again.write(_merged(KEY2, "n"), None)
    assert again.schema_version() == current
    assert again.query("SELECT count(*) AS n FROM schema_version")["n"][0] == 1
    assert again.query("SELECT count(*) AS n FROM artifacts")["n"][0] == 2

    monkeypatch.setattr(lineage, "SCHEMA_VERSION", current + 1)
    monkeypatch.setattr(
        lineage, "MIGRATIONS", {current + 1: ("ALTER TABLE runs ADD COLUMN note VARCHAR",)}
    )
    migrated = LineageDB(path)
    migrated.write(_merged(_key("z")), None)
    assert migrated.schema_version() == current + 1
    assert "note" in migrated.query("SELECT * FROM runs").columns

    monkeypatch.setattr(lineage, "SCHEMA_VERSION", current)
    with pytest.raises(LineageError, match=f"schema version {current + 1} is newer"):
        LineageDB(path).write(_merged(_key("y")), None)


def test_version_1_database_migrates_to_admit_reused_runs(tmp_path: Path) -> None:
    """A lineage database written before 'reused' existed keeps its runs and accepts the
    new status after the migration (DuckDB cannot alter the CHECK: the table is rebuilt)."""
    import duckdb

    from storage.schema import RUNS_TABLE, RUNS_TABLE_V2, TABLES

    path = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(path))
    for ddl in TABLES:  # version 1: the runs table of version 2 without 'reused'
        ddl = RUNS_TABLE_V2 if ddl == RUNS_TABLE else ddl
        con.execute(ddl.replace("'cached', 'reused', 'failed'", "'cached', 'failed'"))
    con.execute("INSERT INTO schema_version VALUES (1, now())")
    con.execute(
        "INSERT INTO runs (run_id, stage, status, started_at) VALUES ('r1', 'merge', 'cached', now())"
    )
    with pytest.raises(duckdb.ConstraintException):
        con.execute(
            "INSERT INTO runs (run_id, stage, status, started_at) VALUES ('r0', 'merge', 'reused', now())"
        )
    con.close()
    assert "'reused'" in RUNS_TABLE_V2

    db = LineageDB(path)
    _write(db, "merge", Lineage(), status="reused")
    from storage.schema import SCHEMA_VERSION

    assert db.schema_version() == SCHEMA_VERSION
    rows = db.query("SELECT run_id, status FROM v_runs ORDER BY status")
    assert rows["status"].to_list() == ["cached", "reused"]
    assert "r1" in rows["run_id"].to_list()
    assert (
        db.query(
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'runs_v1'"
        )["n"][0]
        == 0
    )


def test_ancestors_and_descendants_exact_sets(tmp_path: Path) -> None:
    db = LineageDB(tmp_path / "l.duckdb")
    ids = _dag(db)
    name = {v: k for k, v in ids.items()}
    as_names = lambda df: sorted(name[i] for i in df["artifact_id"])  # noqa: E731
    assert as_names(db.ancestors(ids["x"])) == ["a", "b", "c", "m1", "m2"]
    assert as_names(db.ancestors("cluster0-merge-2")) == ["a", "b", "c", "m1"]
    assert as_names(db.descendants(ids["a"])) == ["m1", "m2", "x"]
    assert as_names(db.descendants("zoo/b")) == ["m1", "m2", "x"]
    assert as_names(db.descendants(ids["c"])) == ["m2", "x"]
    assert db.ancestors(ids["a"]).height == 0 and db.descendants(ids["d"]).height == 0
    assert db.query(
        "SELECT parent_name, role FROM v_lineage WHERE child_name = 'final' ORDER BY parent_name"
    ).rows() == [("cluster0-merge-2", "expert"), ("zoo/b", "expert")]
    again = Artifact(ids["x"], kind="mixture", parents=((ids["m2"], "expert"),))
    db.write(Lineage([again]), None)  # re-recording an edge is a no-op
    assert db.query("SELECT count(*) AS n FROM edges")["n"][0] == 6
    with pytest.raises(LineageError, match="own parent"):
        db.write(
            Lineage([Artifact(ids["x"], kind="mixture", parents=((ids["x"], "input"),))]), None
        )


def test_resolve_by_name_prefix_and_history(tmp_path: Path) -> None:
    db = LineageDB(tmp_path / "l.duckdb")
    a1, a2 = "aaaa1111" + "0" * 56, "aaaa2222" + "0" * 56
    db.write(
        Lineage([*_merged(a1, "cluster0-merge").artifacts, *_merged(a2, "other").artifacts]), None
    )
    assert db.resolve(a1) == a1
    assert db.resolve("cluster0-merge") == a1
    assert db.resolve("aaaa2") == a2
    with pytest.raises(LineageError, match="ambiguous.*aaaa1111.*aaaa2222"):
        db.resolve("aaaa")
    with pytest.raises(LineageError, match="no artifact named 'nope'"):
        db.resolve("nope")
    # a zoo name that later points at new weights resolves to the newest, history kept
    t0 = datetime(2024, 1, 1)
    for fp, day in (("v1", 0), ("v1", 1), ("v2", 2)):
        seen = {"fingerprint": _key(fp), "name": "org/llama-ft", "uri": "/zoo/ft"}
        db.write(Lineage(models=[{**seen, "seen_at": t0 + timedelta(days=day)}]), None)
    assert db.resolve("org/llama-ft") == _key("v2")
    hist = db.query(
        "SELECT fingerprint FROM model_names WHERE name = ? ORDER BY seen_at", ["org/llama-ft"]
    )
    assert hist["fingerprint"].to_list() == [_key("v1"), _key("v2")]
    seen = db.query(
        "SELECT first_seen, last_seen FROM models WHERE fingerprint = ?", [_key("v1")]
    ).row(0)
    assert seen == (t0, t0 + timedelta(days=1))


def test_query_refuses_writes(tmp_path: Path) -> None:
    db = LineageDB(tmp_path / "l.duckdb")
    _dag(db)
    for sql in [
        "DELETE FROM artifacts",
        "SELECT 1; DROP TABLE edges",
        "COPY artifacts TO 'out.csv'",
        "ATTACH 'other.duckdb'",
        "UPDATE runs SET status = 'failed'",
    ]:
        with pytest.raises(ReadOnlyQueryError):
            db.query(sql)
    assert db.query("SELECT count(*) AS n FROM artifacts")["n"][0] == 7
    assert (
        db.query("WITH k AS (SELECT kind FROM artifacts) SELECT count(DISTINCT kind) AS n FROM k")[
            "n"
        ][0]
        == 3
    )
    assert "artifact_id" in db.query("DESCRIBE artifacts")["column_name"].to_list()
    assert "v_leaderboard" in db.query("SHOW TABLES")["name"].to_list()
    reader = LineageDB(db.path, read_only=True)
    assert reader.ancestors("final").height == 5
    with pytest.raises(LineageError, match="opened read-only"):
        reader.write(_merged(KEY), None)
    with pytest.raises(LineageError, match="no lineage database at"):
        LineageDB(tmp_path / "missing.duckdb", read_only=True).query("SELECT 1")
    assert not (tmp_path / "missing.duckdb").exists()
    # the real guard is the read-only connection, even past the statement check
    with pytest.raises(duckdb.Error, match="read-only"):
        db._select("CREATE TABLE sneaky (a INT)")


def _python(code: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, **popen
    )


def test_second_process_reads_after_writer_closed(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    db = LineageDB(path)
    ids = _dag(db)
    p = _python(
        f"""
        from storage import LineageDB
        db = LineageDB({str(path)!r})
        print(db.query("SELECT count(*) AS n FROM artifacts")["n"][0], len(db.ancestors({ids["x"]!r})))
        """,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.split() == ["7", "5"]


def test_reader_waits_for_a_writer_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    LineageDB(path).write(_merged(KEY, "mine"), None)
    holder = _python(
        f"""
        import duckdb, sys, time
        con = duckdb.connect({str(path)!r})
        con.execute("INSERT INTO artifacts (artifact_id, kind, name, created_at) VALUES ('{KEY2}', 'merged', 'theirs', now())")
        print("locked", flush=True)
        time.sleep(3)
        con.close()
        """,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LineageLockedError, match="locked by another process"):
            LineageDB(path, lock_timeout_s=0.3).query("SELECT 1")
        names = LineageDB(path, lock_timeout_s=60).query("SELECT name FROM artifacts ORDER BY name")
        # the row the holder wrote is visible: the read ran after the holder released the file
        assert names["name"].to_list() == ["mine", "theirs"]
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0


def test_transaction_is_atomic(tmp_path: Path) -> None:
    db = LineageDB(tmp_path / "l.duckdb")
    with pytest.raises(RuntimeError):
        with db.transaction():
            _write(db, "merge", _merged(KEY))
            raise RuntimeError("stage failed")
    assert db.query("SELECT count(*) AS n FROM artifacts")["n"][0] == 0
    assert db.query("SELECT count(*) AS n FROM runs")["n"][0] == 0
    with db.transaction():
        _write(db, "merge", _merged(KEY))
        assert db.query("SELECT count(*) AS n FROM artifacts")["n"][0] == 1  # reads see own writes
    with pytest.raises(LineageError, match="recorded as kind 'merged', not 'mixture'"):
        db.write(Lineage([Artifact(KEY, kind="mixture")]), None)


def test_runs_cache_hits_and_views(tmp_path: Path) -> None:
    db = LineageDB(tmp_path / "l.duckdb")
    flow = db.start_flow_run(flow="model_glue", config_hash="c0ffee", params={"threshold": 0.95})
    t0 = T0
    run = _write(
        db,
        "merge",
        _merged(KEY, "cluster0-merge"),
        code_version="merge-1",
        cache_key="k1",
        params={"method": "ties"},
        inputs=[_key("a"), _key("b")],
        flow_run_id=flow,
        started_at=t0,
        finished_at=t0 + timedelta(seconds=2.5),
    )
    hit = _write(
        db,
        "merge",
        _merged(KEY),
        status="cached",
        started_at=t0 + timedelta(seconds=10),
        finished_at=t0 + timedelta(seconds=10.25),
        code_version="merge-1",
        cache_key="k1",
        flow_run_id=flow,
    )
    _write(
        db,
        "evaluate",
        Lineage(),
        status="failed",
        error="lm-eval: task not found",
        flow_run_id=flow,
        started_at=t0 + timedelta(seconds=11),
        finished_at=t0 + timedelta(seconds=11),
    )
    db.finish_flow_run(flow, "failed", error="evaluate failed")
    runs = db.query(
        "SELECT run_id, status, seconds, output_names, flow FROM v_runs ORDER BY started_at"
    )
    assert runs.filter(pl.col("run_id") == run).row(0)[1:] == (
        "completed",
        2.5,
        "cluster0-merge",
        "model_glue",
    )
    assert runs.filter(pl.col("run_id") == hit).row(0)[1:] == (
        "cached",
        0.25,
        "cluster0-merge",
        "model_glue",
    )
    assert db.query("SELECT run_id FROM runs WHERE status = 'cached'")["run_id"].to_list() == [hit]
    assert json.loads(db.query("SELECT params FROM runs WHERE run_id = ?", [run])["params"][0]) == {
        "method": "ties"
    }
    assert db.query("SELECT status, error FROM flow_runs").row(0) == ("failed", "evaluate failed")
    assert db.query("SELECT count(*) FROM runs WHERE status = 'running'").item() == 0
    with pytest.raises(LineageError, match="run status must be one of"):
        _write(db, "merge", Lineage(), status="done")
    with pytest.raises(LineageError, match="no flow run 'missing'"):
        db.finish_flow_run("missing", "completed")


def test_bulk_records_similarities_clusters_trials(tmp_path: Path) -> None:
    db = LineageDB(tmp_path / "l.duckdb")

    def count(table: str) -> int:
        return db.query(f"SELECT count(*) FROM {table}").item()

    def details(table: str, rows: list[dict], run_id: str | None = None, **constants) -> None:
        db.write(Lineage(details=[Details(table, rows, constants)]), run_id)

    n_layers, projs = (
        40,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    tensors = [
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}.weight"
        for i in range(n_layers)
        for p in projs
    ]
    pairs = [(_key(f"m{i}"), _key(f"m{j}")) for i in range(4) for j in range(i + 1, 4)]  # 6 pairs
    rows = [
        {"model_a": a, "model_b": b, "tensor": t, "value": (li % 10) / 10}
        for a, b in pairs
        for li, t in enumerate(tensors)
    ]
    details("tensor_similarities", rows, "r1", metric="cosine_cols")
    assert count("tensor_similarities") == 6 * 280
    per_layer = db.query(
        "SELECT layer, avg(value) AS v FROM tensor_similarities WHERE model_a = ? AND model_b = ? GROUP BY layer ORDER BY layer",
        [pairs[0][0], pairs[0][1]],
    )
    assert per_layer["layer"].to_list() == list(range(n_layers))
    # layer 0 holds tensors 0..6 -> values 0.0..0.6, mean 0.3
    assert per_layer["v"][0] == pytest.approx(0.3)
    pair = {"model_a": pairs[0][0], "model_b": pairs[0][1], "metric": "cosine_cols"}
    details("similarities", [{**pair, "value": 0.97}], tensor_set="mlp")
    assert count("similarities") == 1
    members = {_key("m0"): 0, _key("m1"): 0, _key("m2"): 1}
    cl1 = [{"model_fingerprint": fp, "cluster": c} for fp, c in members.items()]
    details("clusters", cl1, "r2", clustering_id="cl1")
    cl2 = [{"model_fingerprint": _key("m0"), "cluster": 0}] + [
        {"model_fingerprint": _key(m), "cluster": 1} for m in ("m1", "m2")
    ]
    details("clusters", cl2, clustering_id="cl2")
    assert db.query(
        "SELECT clustering_id, cluster, count(*) AS n FROM clusters GROUP BY ALL ORDER BY ALL"
    ).rows() == [("cl1", 0, 2), ("cl1", 1, 1), ("cl2", 0, 1), ("cl2", 1, 2)]
    trials = [
        {
            "trial": 0,
            "strategy": "coefficient",
            "method": "linear",
            "coefficients": [0.5, 0.5],
            "proxy_score": 0.4,
            "accepted": True,
        },
        {
            "trial": 1,
            "strategy": "coefficient",
            "method": "linear",
            "coefficients": [0.9, 0.1],
            "proxy_score": 0.3,
            "accepted": False,
            "reason": "worse",
        },
    ]
    details("trials", trials, "r3", search_id="s")
    got = db.query("SELECT trial, coefficients, accepted, reason FROM trials ORDER BY trial").rows()
    assert [(t, json.loads(c), a, r) for t, c, a, r in got] == [
        (0, [0.5, 0.5], True, None),
        (1, [0.9, 0.1], False, "worse"),
    ]
    # recording a stage's details again (a rerun after a crash, a cache hit) adds nothing
    details("trials", trials, "r4", search_id="s")
    details("clusters", cl1, "r5", clustering_id="cl1")
    details("tensor_similarities", rows, "r6", metric="cosine_cols")
    assert (count("trials"), count("clusters"), count("tensor_similarities")) == (2, 6, 6 * 280)
    with pytest.raises(
        LineageError, match=r"table 'similarities' lack column\(s\) \['tensor_set'\]"
    ):
        details("similarities", [{"model_a": "x", "model_b": "y", "metric": "c", "value": 1.0}])


def test_leaderboard_pivot_values(tmp_path: Path) -> None:
    db = LineageDB(tmp_path / "l.duckdb")
    ids = {n: _key(n) for n in ["base", "merge", "mix"]}
    db.write(Lineage([a for n, i in ids.items() for a in _merged(i, n).artifacts]), None)

    def evaluate(flow: str, artifact_id: str, rows: list[dict], limit: int, at: datetime) -> None:
        # created_at orders a rescoring after the first score
        constants = {"artifact_id": artifact_id, "eval_limit": limit, "created_at": at}
        scores = Lineage(details=[Details("scores", rows, constants)])
        _write(db, "evaluate", scores, flow_run_id=flow, started_at=at, finished_at=at)

    old_flow = db.start_flow_run(flow="eval", started_at=T0)
    add = {"task": "add", "metric": "exact_match"}
    evaluate(old_flow, ids["merge"], [{**add, "value": 0.10}], 100, T0)
    flow = db.start_flow_run("prefect-flow-run-2", flow="eval", started_at=T0 + timedelta(days=1))
    scores = {
        "base": {"add": 0.05, "next": 0.03},
        "merge": {"add": 0.28, "next": 0.34},
        "mix": {"add": 1.00, "next": 0.50},
    }
    for n, s in scores.items():
        rows = [
            {"task": t, "metric": "exact_match", "value": v, "stderr": 0.01, "n_samples": 200}
            for t, v in s.items()
        ]
        rows.append({"task": "arc", "metric": "acc", "value": 0.2})
        rows.append({"task": "arc", "metric": "acc_norm", "value": 0.3 if n != "base" else 0.6})
        evaluate(flow, ids[n], rows, 200, T0 + timedelta(days=1))
    board = db.leaderboard(metrics={"arc": "acc_norm"})
    assert board.columns == [
        "artifact_id", "name", "kind", "add", "arc", "next", "mean", "n_tasks", "final"
    ]  # fmt: skip
    assert board["name"].to_list() == ["mix", "merge", "base"]
    assert board.row(0)[3:-1] == pytest.approx((1.0, 0.3, 0.5, 0.6, 3))
    # 'merge' was scored twice on 'add': the latest score (0.28) counts, not the old 0.10
    assert board.row(1)[3:-1] == pytest.approx((0.28, 0.3, 0.34, 0.92 / 3, 3))
    assert board.row(2)[3:-1] == pytest.approx((0.05, 0.6, 0.03, 0.68 / 3, 3))

    wide = db.leaderboard()
    assert {"arc:acc", "arc:acc_norm", "add", "next"} <= set(wide.columns)
    assert wide.filter(pl.col("name") == "base")["mean"][0] == pytest.approx(
        (0.05 + 0.2 + 0.6 + 0.03) / 4
    )

    only_old = db.leaderboard(flow_run_id=old_flow)
    assert only_old.select("name", "add", "mean", "n_tasks").rows() == [("merge", 0.10, 0.10, 1)]
    assert (
        db.query("SELECT eval_limit FROM v_leaderboard WHERE name = 'merge' AND task = 'add'")[
            "eval_limit"
        ][0]
        == 200
    )
