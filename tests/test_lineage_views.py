"""The documented lineage questions (docs/lineage.md), run as written on a small history:
two nightly flow runs, the second after one zoo model changed."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import ROOT

T0 = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)


def _queries() -> list[str]:
    text = (ROOT / "docs" / "lineage.md").read_text()
    section = text.split("The four questions of a nightly run", 1)[1].split("More:", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


@pytest.fixture
def history(tmp_path):
    from storage import LineageDB

    db = LineageDB(tmp_path / "lineage.duckdb")
    for night, (sums_fp, merge_id, sums_value) in enumerate(
        [("fp-sums-1", "merge-1", 0.6), ("fp-sums-2", "merge-2", 0.8)]
    ):
        flow = f"night-{night}"
        start = T0 + timedelta(days=night)
        db.start_flow_run(flow, flow="model-glue-recipe", started_at=start)

        def run(stage: str, key: str, status: str = "completed", start=start, flow=flow) -> str:
            return db.record_run(
                stage,
                status=status,
                started_at=start,
                finished_at=start,
                cache_key=key,
                code_version=f"{stage}-1",
                flow_run_id=flow,
            )

        for name, fp in (("llama-base", "fp-base"), ("llama-sums", sums_fp), ("other", "fp-other")):
            db.record_model(
                fp, name=name, uri=f"/zoo/{name}", run_id=run("fingerprint", fp), seen_at=start
            )
        m = run("merge", f"key-{merge_id}")
        db.record_artifact(
            merge_id,
            kind="merged",
            name=f"merge-llama-{night}",
            run_id=m,
            parents=[sums_fp],
            role="member",
        )
        db.record_edges(["fp-base"], merge_id, m, role="base")
        x = run("mixture", f"key-mix-{night}")
        db.record_artifact(
            f"mix-{night}",
            kind="mixture",
            name=f"mixture-{night}",
            run_id=x,
            parents=[merge_id, "fp-other"],
            role="expert",
        )
        for artifact, value in ((merge_id, sums_value), ("fp-other", 0.7), (f"mix-{night}", 0.75)):
            e = run("evaluate", f"key-eval-{artifact}")
            db.record_scores(
                artifact, e, [{"task": "my_sums", "metric": "exact_match", "value": value}]
            )
        db.finish_flow_run(flow, "completed")
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
