"""The documented lineage questions (docs/lineage.md), run as written on a small history:
two nightly flow runs, the second after one zoo model changed. The history is written as
the flow's recorder writes a run (a ``runs`` row, then the stage's lineage); the named
queries that the CLI, ``glue report`` and ``glue plan`` ask are checked on it too."""

from __future__ import annotations

import itertools
import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from storage import Artifact, Details, Lineage, LineageDB, LineageError
from tests.conftest import ROOT

T0 = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)


def _queries() -> list[str]:
    text = (ROOT / "docs" / "lineage.md").read_text()
    section = text.split("The four questions of a nightly run", 1)[1].split("More:", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def record(
    db: LineageDB,
    flow: str,
    stage: str,
    key: str,
    lineage: Lineage,
    at: datetime,
    label: str,
    status: str = "completed",
    error: str | None = None,
) -> str:
    """A stage call as the flow's recorder writes it: its run row, then what its stage's
    lineage says it made, in one transaction (see flows/_recorder.py)."""
    with db.transaction():
        run_id = db.record_run(
            stage,
            status=status,
            started_at=at,
            finished_at=at + timedelta(seconds=1),
            cache_key=key,
            code_version=f"{stage}-1",
            key_parts={"stage": stage, "key": key},
            flow_run_id=flow,
            label=label,
            outputs=[a.artifact_id for a in lineage.artifacts],
            error=error,
        )
        db.write(lineage, run_id)
    return run_id


def scores(artifact_id: str, values: dict[str, float]) -> Details:
    """An evaluation's ``scores`` rows, as the evaluate stage's lineage declares them."""
    rows = [{"task": t, "metric": "exact_match", "value": v} for t, v in values.items()]
    return Details("scores", rows, {"artifact_id": artifact_id, "eval_limit": 20})


def evaluation(key: str, artifact_id: str, values: dict[str, float]) -> Lineage:
    parent = ((artifact_id, "input"),)
    return Lineage(
        [Artifact(key, kind="evaluation", stage="evaluate", parents=parent)],
        [scores(artifact_id, values)],
    )


@pytest.fixture
def history(tmp_path) -> LineageDB:
    db = LineageDB(tmp_path / "lineage.duckdb")
    for night, (sums_fp, merge_id, sums_value) in enumerate(
        [("fp-sums-1", "merge-1", 0.6), ("fp-sums-2", "merge-2", 0.8)]
    ):
        flow = f"night-{night}"
        start = T0 + timedelta(days=night)
        minutes = (start + timedelta(minutes=i) for i in itertools.count())
        db.start_flow_run(flow, flow="model-glue-recipe", started_at=start)
        for name, fp in (("llama-base", "fp-base"), ("llama-sums", sums_fp), ("other", "fp-other")):
            seen = {"fingerprint": fp, "name": name, "uri": f"/zoo/{name}", "seen_at": start}
            seen["arch_signature"] = "llama"
            record(db, flow, "fingerprint", fp, Lineage(models=[seen]), next(minutes), name)
        merged = Artifact(
            merge_id,
            kind="merged",
            name=f"merge-llama-{night}",
            stage="merge",
            parents=((sums_fp, "member"), ("fp-base", "base")),
        )
        label = "cluster of llama-base"
        record(db, flow, "merge", f"key-{merge_id}", Lineage([merged]), next(minutes), label)
        mixture = Artifact(
            f"mix-{night}",
            kind="mixture",
            name=f"mixture-{night}",
            stage="mixture",
            parents=((merge_id, "expert"), ("fp-other", "expert")),
        )
        record(db, flow, "mixture", f"key-mix-{night}", Lineage([mixture]), next(minutes), "mix")
        for artifact, value in ((merge_id, sums_value), ("fp-other", 0.7), (f"mix-{night}", 0.75)):
            key = f"key-eval-{artifact}"
            lineage = evaluation(key, artifact, {"my_sums": value})
            record(db, flow, "evaluate", key, lineage, next(minutes), f"eval {artifact}")
        db.finish_flow_run(flow, "completed", finished_at=start + timedelta(hours=1))
    return db


def test_the_documented_queries_answer_their_questions(history):
    contains, scores, changed, best = (history.query(q) for q in _queries())
    # every version of the name: night 0's weights and night 1's
    assert contains.rows() == [
        ("merge-llama-0", "merged"),
        ("merge-llama-1", "merged"),
        ("mixture-0", "mixture"),
        ("mixture-1", "mixture"),
    ]
    assert {(r[0], r[4]) for r in scores.rows()} == {
        ("merge-llama-0", 0.6),
        ("merge-llama-1", 0.8),
        ("mixture-0", 0.75),
        ("mixture-1", 0.75),
    }
    # night 1 recomputed what depends on the changed model, not 'other' or the base
    assert sorted(changed["cache_key"].to_list()) == sorted(
        ["fp-sums-2", "key-merge-2", "key-mix-1", "key-eval-merge-2", "key-eval-mix-1"]
    )
    assert [(r[3], r[5]) for r in best.rows()] == [("mixture-0", 0.75), ("merge-llama-1", 0.8)]


def test_flow_runs_and_stage_calls_by_name(history):
    """What glue leaderboard, glue report and glue plan ask about runs."""
    latest = history.latest_flow_run()
    assert (latest["flow_run_id"], latest["status"]) == ("night-1", "completed")
    assert history.latest_flow_run("night-0")["started_at"] == T0.replace(tzinfo=None)
    with pytest.raises(LineageError, match="no flow run 'nope'"):
        history.latest_flow_run("nope")
    assert history.previous_flow_run(latest) == "night-0"
    assert history.previous_flow_run(history.latest_flow_run("night-0")) is None
    history.start_flow_run("night-2", flow="model-glue-recipe", started_at=T0 + timedelta(days=2))
    assert history.latest_flow_run()["flow_run_id"] == "night-1"  # a running one is not latest

    calls = history.stage_runs_of("night-1")
    assert calls.columns == ["stage", "label", "status", "cache_key", "error", "seconds"]
    assert calls["stage"].to_list() == ["fingerprint"] * 3 + ["merge", "mixture"] + ["evaluate"] * 3
    assert calls["label"].to_list()[:3] == ["llama-base", "llama-sums", "other"]
    assert set(calls["status"]) == {"completed"} and set(calls["seconds"]) == {1.0}

    prev = history.previous_call("fingerprint", "llama-sums")
    assert prev[:2] == ("fp-sums-2", "fingerprint-1")
    assert json.loads(prev.key_parts) == {"stage": "fingerprint", "key": "fp-sums-2"}
    assert history.previous_call("fingerprint", "never-seen") is None
    # a later failed call: the last run says so; the previous call is still the good one
    failed = dict(status="failed", error="CheckpointError: truncated")
    at = T0 + timedelta(days=2)
    record(history, "night-2", "fingerprint", "fp-sums-3", Lineage(), at, "llama-sums", **failed)
    assert history.last_run_of("fingerprint", "llama-sums") == {
        "status": "failed",
        "cache_key": "fp-sums-3",
        "error": "CheckpointError: truncated",
    }
    assert history.previous_call("fingerprint", "llama-sums").cache_key == "fp-sums-2"
    assert history.last_run_of("merge", "nothing") is None

    assert history.arch_signature_of("llama-sums") == "llama"
    assert history.arch_signature_of("unknown") is None
    names = history.artifact_names()
    assert (names["fp-sums-1"], names["fp-sums-2"], names["merge-2"]) == (
        "llama-sums",
        "llama-sums",
        "merge-llama-1",
    )
    assert history.parents_of("mix-1").rows() == [("merge-llama-1", "expert"), ("other", "expert")]


def test_leaderboards_of_a_run_and_of_everything(history):
    night0 = history.leaderboard("night-0")
    assert night0.select("name", "my_sums").rows() == [
        ("mixture-0", 0.75),
        ("other", 0.7),
        ("merge-llama-0", 0.6),
    ]
    # v_leaderboard: the latest score of every artifact, whichever run recorded it
    everything = history.leaderboard()
    assert everything.select("name", "mean").rows() == [
        ("merge-llama-1", 0.8),
        ("mixture-0", 0.75),
        ("mixture-1", 0.75),
        ("other", 0.7),
        ("merge-llama-0", 0.6),
    ]
    assert not any(everything["final"])


def _run_with_final(db: LineageDB, zoo: dict[str, dict], made: dict[str, dict], final: str):
    """One flow run: zoo models and combinations scored on the test split, then the final
    choice (what the final stage's lineage records); returns the flow run id."""
    flow = db.start_flow_run(flow="model-glue-recipe", started_at=T0)
    minutes = (T0 + timedelta(minutes=i) for i in itertools.count())
    for name, values in zoo.items():
        seen = {"fingerprint": f"fp-{name}", "name": name, "uri": f"/zoo/{name}"}
        record(db, flow, "fingerprint", f"fp-{name}", Lineage(models=[seen]), next(minutes), name)
        lineage = evaluation(f"eval-{name}", f"fp-{name}", values)
        record(db, flow, "evaluate", f"eval-{name}", lineage, next(minutes), name)
    for name, values in made.items():
        stage, kind = ("mixture", "mixture") if name.startswith("mix") else ("merge", "merged")
        made_it = Lineage([Artifact(name, kind=kind, name=name, stage=stage)])
        record(db, flow, stage, f"key-{name}", made_it, next(minutes), name)
        lineage = evaluation(f"eval-{name}", name, values)
        record(db, flow, "evaluate", f"eval-{name}", lineage, next(minutes), name)
    kind = "mixture" if final.startswith("mix") else "merged" if final in made else "model"
    chosen = {"artifact_id": final if final in made else f"fp-{final}", "name": final}
    row = chosen | {"kind": kind, "proxy_mean": 0.9}
    choice = Lineage(
        [Artifact("final-key", kind="selection", name="final-choice", stage="final")],
        [Details("finals", [row], {"selection_id": "final-key"})],
    )
    record(db, flow, "final", "final-key", choice, next(minutes), "best of the run")
    db.finish_flow_run(flow, "completed")
    return flow


def test_the_headline_is_the_final_model_against_the_zoo(tmp_path):
    from glue.cli import final_line

    db = LineageDB(tmp_path / "lineage.duckdb")
    zoo = {"a": {"t1": 0.5, "t2": 0.1}, "b": {"t1": 0.2, "t2": 0.6}}  # means 0.3 and 0.4
    # a merge better than the final model on both tasks: not part of the zoo's per-task best
    made = {"merge": {"t1": 0.9, "t2": 0.9}, "mix": {"t1": 0.7, "t2": 0.5}}
    flow = _run_with_final(db, zoo, made, final="mix")
    h = db.headline(flow)
    assert (h.name, h.kind, h.proxy_mean, h.best_single) == ("mix", "mixture", 0.9, "b")
    assert h.test_mean == pytest.approx(0.6)
    assert h.best_single_test_mean == pytest.approx(0.4)
    assert h.gain == pytest.approx(0.2)
    assert h.relative_gain == pytest.approx(0.5)
    assert h.oracle_mean == pytest.approx((0.5 + 0.6) / 2)  # per task: a's t1, b's t2
    assert h.of_oracle == pytest.approx(0.6 / 0.55)
    assert final_line(h.to_dict()) == (
        "final model: mix (mixture), chosen on the proxy split; test mean 0.600: +0.200 "
        "(+50.0%) over the best single model b (0.400), 1.09 of the per-task best of the zoo "
        "(0.550)"
    )
    # the leaderboard the caller already has gives the same figures
    assert db.headline(flow, board=db.leaderboard(flow)) == h
    # any other model of the run, against the same zoo (what the report shows without a final)
    merge = db.headline(flow, "merge")
    assert (merge.proxy_mean, merge.gain, merge.oracle_mean) == (
        None,
        pytest.approx(0.5),
        h.oracle_mean,
    )


def test_a_zoo_that_scores_zero_everywhere_has_no_fraction_to_give(tmp_path):
    from glue.cli import final_line

    db = LineageDB(tmp_path / "lineage.duckdb")
    zoo = {"a": {"t1": 0.0, "t2": 0.0}, "b": {"t1": 0.0, "t2": 0.0}}
    flow = _run_with_final(db, zoo, {}, final="a")
    h = db.headline(flow)
    assert (h.name, h.kind, h.test_mean, h.gain, h.oracle_mean) == ("a", "model", 0.0, 0.0, 0.0)
    assert h.relative_gain is None and h.of_oracle is None
    assert final_line(h.to_dict()).endswith(
        "+0.000 over the best single model a (0.000), n/a of the per-task best of the zoo (0.000)"
    )


def test_no_final_model_no_headline(history):
    assert history.final_ids("night-1") == []
    assert history.headline("night-1") is None


def test_what_the_stages_recorded_by_name(tmp_path):
    """The report's questions about a clustering, a search and a mixture."""
    db = LineageDB(tmp_path / "lineage.duckdb")
    flow = db.start_flow_run(flow="model-glue-recipe", started_at=T0)
    for name in ("a", "b", "c"):
        seen = {"fingerprint": f"fp-{name}", "name": name, "uri": f"/zoo/{name}"}
        db.write(Lineage(models=[seen]), None)
    pairs = [("fp-a", "fp-b", 0.9), ("fp-a", "fp-c", 0.1), ("fp-b", "fp-c", 0.2)]
    sims = [{"model_a": a, "model_b": b, "metric": "sim_all", "value": v} for a, b, v in pairs]
    members = [("fp-a", 0), ("fp-b", 0), ("fp-c", 1)]
    threshold = {
        "arch_signature": "llama",
        "rule": "widest-gap",
        "threshold": 0.55,
        "gap_low": 0.2,
        "gap_high": 0.9,
        "n_pairs": 3,
        "pair_values": [0.1, 0.2, 0.9],
    }
    clustering = Lineage(
        [Artifact("cl", kind="clustering", name="clustering", stage="cluster")],
        [
            Details("similarities", sims, {"tensor_set": "all"}),
            Details("clusters", [{"model_fingerprint": f, "cluster": c} for f, c in members], {"clustering_id": "cl"}),
            Details("cluster_thresholds", [threshold], {"clustering_id": "cl", "metric": "sim_all"}),
        ],
    )  # fmt: skip
    record(db, flow, "cluster", "cl", clustering, T0, "threshold auto on sim_all")
    trials = [
        {"trial": 1, "coefficients": {"a": 1.0}, "proxy_score": 0.5, "accepted": True},
        {"trial": 0, "coefficients": {"a": 0.5, "b": 0.5}, "proxy_score": 0.4, "accepted": False},
    ]
    search = Lineage(
        [Artifact("s", kind="search", name="search", meta={"accepted": ["a"]})],
        [Details("trials", trials, {"search_id": "s", "strategy": "greedy"})],
    )
    record(db, flow, "filter", "s", search, T0 + timedelta(minutes=1), "search in cluster of a")

    assert db.clusters_of("cl").rows() == [(0, "fp-a", "a"), (0, "fp-b", "b"), (1, "fp-c", "c")]
    expected = ("llama", "sim_all", "widest-gap", 0.55, 0.2, 0.9, 3)
    assert db.thresholds_of("cl").rows() == [expected]
    assert db.run_thresholds(flow).rows() == [expected]
    assert db.run_thresholds("another-run").height == 0
    among = db.similarities_among(["fp-a", "fp-b"], "sim_all")
    assert among.rows() == [("fp-a", "fp-b", 0.9)]
    got = db.trials_of("s")
    assert got.columns == ["trial", "strategy", "coefficients", "proxy_score", "accepted", "reason"]
    assert got["trial"].to_list() == [0, 1] and set(got["strategy"]) == {"greedy"}
    assert db.artifact_meta("s") == {"accepted": ["a"]}
    assert db.artifact_meta("cl") == {} and db.artifact_meta("missing") == {}
