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


def record(db, flow: str, stage: str, key: str, lineage, at: datetime, label: str = "") -> str:
    """A stage call as the flow's recorder writes it: its run row, then what its stage's
    lineage says it made, in one transaction (see flows/_recorder.py)."""
    with db.transaction():
        run_id = db.record_run(
            stage,
            status="completed",
            started_at=at,
            finished_at=at,
            cache_key=key,
            code_version=f"{stage}-1",
            flow_run_id=flow,
            label=label or key,
            outputs=[a.artifact_id for a in lineage.artifacts],
        )
        db.write(lineage, run_id)
    return run_id


@pytest.fixture
def history(tmp_path):
    from storage import Artifact, Details, Lineage, LineageDB

    db = LineageDB(tmp_path / "lineage.duckdb")
    for night, (sums_fp, merge_id, sums_value) in enumerate(
        [("fp-sums-1", "merge-1", 0.6), ("fp-sums-2", "merge-2", 0.8)]
    ):
        flow = f"night-{night}"
        start = T0 + timedelta(days=night)
        db.start_flow_run(flow, flow="model-glue-recipe", started_at=start)
        for name, fp in (("llama-base", "fp-base"), ("llama-sums", sums_fp), ("other", "fp-other")):
            seen = {"fingerprint": fp, "name": name, "uri": f"/zoo/{name}", "seen_at": start}
            record(db, flow, "fingerprint", fp, Lineage(models=[seen]), start, name)
        merged = Artifact(
            merge_id,
            kind="merged",
            name=f"merge-llama-{night}",
            stage="merge",
            parents=((sums_fp, "member"), ("fp-base", "base")),
        )
        record(db, flow, "merge", f"key-{merge_id}", Lineage([merged]), start)
        mixture = Artifact(
            f"mix-{night}",
            kind="mixture",
            name=f"mixture-{night}",
            stage="mixture",
            parents=((merge_id, "expert"), ("fp-other", "expert")),
        )
        record(db, flow, "mixture", f"key-mix-{night}", Lineage([mixture]), start)
        for artifact, value in ((merge_id, sums_value), ("fp-other", 0.7), (f"mix-{night}", 0.75)):
            key = f"key-eval-{artifact}"
            evaluation = Lineage(
                [
                    Artifact(
                        key, kind="evaluation", stage="evaluate", parents=((artifact, "input"),)
                    )
                ],
                [
                    Details(
                        "scores",
                        [{"task": "my_sums", "metric": "exact_match", "value": value}],
                        {"artifact_id": artifact, "eval_limit": 20},
                    )
                ],
            )
            record(db, flow, "evaluate", key, evaluation, start)
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
