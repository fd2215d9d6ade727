"""Scores as people read them: a flow run's leaderboard and its headline.

The headline is the paper's figure, computed here once for ``glue run``, the run's Prefect
artifacts and ``glue report``: the final model's test mean against the best single zoo
model's and against the per-task best of the zoo (the "oracle" of the zoo's own models).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import polars as pl

from storage.db import Database
from storage.schema import LATEST_SCORE

# leaderboard columns that are not a task's score
NOT_TASKS = ("artifact_id", "name", "kind", "mean", "n_tasks", "final")


@dataclasses.dataclass(frozen=True)
class Headline:
    """One model of a flow run against the zoo, on the test split (means over the tasks).

    ``best_single``: the zoo model with the best mean; ``gain``: the difference of the
    means (``relative_gain``: as a fraction of the best single one's); ``oracle_mean``:
    the mean over tasks of the best zoo model per task; ``of_oracle``: ``test_mean`` as a
    fraction of it. They are None when there is nothing to compare (no scored zoo model,
    a model without a test mean, or a zero to divide by).
    """

    name: str
    kind: str
    proxy_mean: float | None  # what the final choice read (None: not a final model)
    test_mean: float | None
    best_single: str | None = None
    best_single_test_mean: float | None = None
    gain: float | None = None
    relative_gain: float | None = None
    oracle_mean: float | None = None
    of_oracle: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def headline_of(
    board: pl.DataFrame, artifact_id: str, name: str, kind: str, proxy_mean: float | None
) -> Headline:
    """The headline of ``artifact_id`` on a leaderboard (see :meth:`Scores.leaderboard`)."""
    tasks = [c for c in board.columns if c not in NOT_TASKS]
    rows = board.to_dicts()
    test_mean = next((r["mean"] for r in rows if r["artifact_id"] == artifact_id), None)
    zoo = [r for r in rows if r["kind"] == "model" and r["mean"] is not None]
    if not zoo or test_mean is None:
        return Headline(name, kind, proxy_mean, test_mean)
    best = max(zoo, key=lambda r: r["mean"])
    oracle = sum(max(r[t] or 0.0 for r in zoo) for t in tasks) / len(tasks)
    return Headline(
        name,
        kind,
        proxy_mean,
        test_mean,
        best_single=best["name"],
        best_single_test_mean=best["mean"],
        gain=test_mean - best["mean"],
        relative_gain=(test_mean - best["mean"]) / best["mean"] if best["mean"] else None,
        oracle_mean=oracle,
        of_oracle=test_mean / oracle if oracle else None,
    )


class Scores(Database):
    def leaderboard(
        self, flow_run_id: str | None = None, metrics: Mapping[str, str] | None = None
    ) -> pl.DataFrame:
        """Latest score per artifact and task, one column per task, plus their mean; best first.

        ``metrics`` picks one metric per task (``{"arc_challenge": "acc_norm"}``); a task with
        several recorded metrics and no choice gets one column per metric, ``task:metric``.
        Without ``flow_run_id`` this pivots ``v_leaderboard``; with it, only scores recorded
        by that flow run count (the latest of them, by the same rule), and ``final`` marks
        the model the run chose.
        """
        columns = "artifact_id, name, kind, task, metric, value"
        if flow_run_id:
            latest = self._select(
                f"SELECT {columns} FROM v_scores WHERE flow_run_id = ? {LATEST_SCORE}",
                [flow_run_id],
            )
        else:
            latest = self._select(f"SELECT {columns} FROM v_leaderboard")
        if metrics:
            keep = pl.lit(True)
            for task, metric in metrics.items():
                keep = keep & ((pl.col("task") != task) | (pl.col("metric") == metric))
            latest = latest.filter(keep)
        if latest.height == 0:
            return pl.DataFrame(
                schema={
                    "artifact_id": pl.String,
                    "name": pl.String,
                    "kind": pl.String,
                    "mean": pl.Float64,
                    "n_tasks": pl.UInt32,
                }
            )
        n_metrics = latest.group_by("task").agg(pl.col("metric").n_unique().alias("n"))
        multi = set(n_metrics.filter(pl.col("n") > 1)["task"].to_list())
        latest = latest.with_columns(
            pl.when(pl.col("task").is_in(list(multi)))
            .then(pl.col("task") + ":" + pl.col("metric"))
            .otherwise(pl.col("task"))
            .alias("column")
        )
        tasks = sorted(latest["column"].unique().to_list())
        wide = latest.pivot(
            on="column",
            index=["artifact_id", "name", "kind"],
            values="value",
            aggregate_function="first",
        )
        wide = wide.select(["artifact_id", "name", "kind", *tasks])
        finals = self.final_ids(flow_run_id) if flow_run_id else []
        return wide.with_columns(
            pl.mean_horizontal(tasks).alias("mean"),
            pl.sum_horizontal([pl.col(c).is_not_null() for c in tasks]).alias("n_tasks"),
            pl.col("artifact_id").is_in(finals).alias("final"),
        ).sort(["mean", "artifact_id"], descending=[True, False], nulls_last=True)

    def final_ids(self, flow_run_id: str) -> list[str]:
        """The artifact(s) that ``flow_run_id`` chose as its final model."""
        rows = self._select(
            "SELECT f.artifact_id FROM finals f JOIN runs r ON r.run_id = f.run_id "
            "WHERE r.flow_run_id = ?",
            [flow_run_id],
        )
        return rows["artifact_id"].to_list()

    def headline(
        self,
        flow_run_id: str,
        artifact_id: str | None = None,
        board: pl.DataFrame | None = None,
    ) -> Headline | None:
        """The headline of the flow run's final model (None when it chose none), or of
        ``artifact_id``. ``board``: the run's leaderboard, when the caller has it already."""
        board = self.leaderboard(flow_run_id) if board is None else board
        if artifact_id is None:
            final = self._select(
                "SELECT f.artifact_id, f.name, f.kind, f.proxy_mean FROM finals f "
                "JOIN runs r ON r.run_id = f.run_id WHERE r.flow_run_id = ? "
                "ORDER BY f.created_at DESC LIMIT 1",
                [flow_run_id],
            )
            if final.height == 0:
                return None
            return headline_of(board, *final.row(0))
        row = board.filter(pl.col("artifact_id") == artifact_id).row(0, named=True)
        return headline_of(board, artifact_id, row["name"], row["kind"], None)
