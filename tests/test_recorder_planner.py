"""The recorder (flows/_recorder.py) and the planner (flows/plan.py) on a toy stage, without
a Prefect server: the recorder turns each task state into a ``runs`` row plus the stage's
lineage; the planner answers each call from the store and says why a call is stale."""

from __future__ import annotations

import io
from collections import Counter
from datetime import UTC, datetime

import pytest
from prefect.states import Completed, Failed
from rich.console import Console

from flows._recorder import Recorder
from flows.plan import Planner
from model_glue.checkpoint import CheckpointError
from storage import Artifact, ArtifactStore, Lineage, LineageDB
from tasks.stage import REUSED, Component, Stage, call

RUNS: Counter = Counter()


def _square(store: ArtifactStore, key: str, x: int, power: int = 2) -> dict:
    RUNS[x] += 1
    if x < 0:
        raise CheckpointError(f"toy input {x} is negative")
    return {"y": x**power}


SQUARE = Stage(
    "square",
    compute=_square,
    uses=Component("square", "1"),
    lineage=lambda c, r: Lineage(
        artifacts=[Artifact(r["key"], kind="record", name=c.label, stage="square")]
    ),
    describe=lambda r: [f"y = {r['y']}"],
)
square = SQUARE.task()


@pytest.fixture
def project(tmp_path):
    RUNS.clear()
    store_url, db_path = str(tmp_path / "store"), str(tmp_path / "lineage.duckdb")
    db = LineageDB(db_path)
    flow_run = db.start_flow_run(flow="toy")
    out = io.StringIO()
    rec = Recorder(db, store_url, flow_run, console=Console(file=out, width=200))
    return rec, out, store_url, db_path


def record(rec: Recorder, c, state):
    """What ``Recorder.run_many`` does with a finished task run's state."""
    started = datetime.now(UTC)
    with rec.db.transaction():
        o = rec._record(c, state, started, 0.1, ArtifactStore(rec.store_url))
    rec._print(c, o)
    return o


def test_each_state_becomes_one_run_row_with_its_status(project):
    rec, out, store_url, _ = project
    c = call(square, "three", x=3)
    fresh = square.fn(store_url=store_url, key=c.key, **c.params)
    assert record(rec, c, Completed(data=dict(fresh))).status == "completed"
    again = square.fn(store_url=store_url, key=c.key, **c.params)
    assert again[REUSED] and record(rec, c, Completed(data=dict(again))).status == "reused"
    cached = record(rec, c, Completed(data=dict(fresh), name="Cached"))
    bad = call(square, "minus one", x=-1)
    handled = square.fn(store_url=store_url, key=bad.key, **bad.params)
    failed = record(rec, bad, handled)
    assert (cached.status, failed.status, failed.expected) == ("cached", "failed", True)
    assert failed.error == "CheckpointError: toy input -1 is negative"

    runs = rec.db.stage_runs_of(rec.flow_run_id)
    assert runs["status"].to_list() == ["completed", "reused", "cached", "failed"]
    assert runs["label"].to_list() == ["three"] * 3 + ["minus one"]
    assert rec.counts == {"square": {"completed": 1, "reused": 1, "cached": 1, "failed": 1}}
    assert [str(f) for f in rec.failures] == [
        "square minus one: CheckpointError: toy input -1 is negative"
    ]
    assert rec.db.resolve("three") == c.key  # the stage's lineage, written with its run
    printed = out.getvalue()
    assert "completed square      three" in printed and "y = 9" in printed
    assert "failed square      minus one: CheckpointError: toy input -1" in printed


def test_an_unexpected_exception_is_a_failure_not_marked_expected(project):
    rec, *_ = project
    c = call(square, "boom", x=5)
    o = record(rec, c, Failed(data=RuntimeError("disk\non fire")))
    assert (o.status, o.expected, o.error) == ("failed", False, "RuntimeError: disk on fire")
    assert rec.failures[0].expected is False


def test_the_planner_says_fresh_new_changed_or_failing_again(project):
    rec, _, store_url, db_path = project
    three, four = call(square, "three", x=3), call(square, "four", x=4)
    for c in (three, four):
        record(rec, c, Completed(data=square.fn(store_url=store_url, key=c.key, **c.params)))
    bad = call(square, "minus one", x=-1)
    record(rec, bad, square.fn(store_url=store_url, key=bad.key, **bad.params))

    planner = Planner(store_url, db_path)
    cube = call(square, "three", x=3, power=3)  # a changed parameter, same label
    outcomes = planner.run_many([call(square, "four", x=4), cube, bad, call(square, "five", x=5)])
    assert [o.status for o in outcomes] == ["fresh", "stale", "stale", "stale"]
    reasons = [(e.label, e.status, e.reason) for e in planner.entries]
    assert reasons == [
        ("four", "fresh", "reused"),
        ("three", "stale", "changed parameter power: 2 -> 3"),
        ("minus one", "stale", "fails again: CheckpointError: toy input -1 is negative"),
        ("five", "stale", "new: no earlier run of this call"),
    ]
    assert sum(RUNS.values()) == 3  # planning computed nothing
