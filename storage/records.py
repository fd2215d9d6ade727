"""What a stage run records, declared once: the write records (:class:`Lineage` and its
parts) and the detail tables, whose DDL (``storage/schema.py``) and whose writer's column
lists (``storage/writes.py``) both follow from :data:`DETAIL_TABLES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Artifact:
    """A stage output for the ``artifacts`` table, with its parents as ``(id, role)``
    pairs (roles: input, member, base, expert, backbone)."""

    artifact_id: str
    kind: str
    name: str | None = None
    uri: str | None = None
    content_hash: str | None = None
    stage: str | None = None
    parents: tuple[tuple[str, str], ...] = ()
    meta: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Details:
    """Rows (dicts) for one detail table, a key of :data:`DETAIL_TABLES`; ``constants``
    fill columns every row shares."""

    table: str
    rows: Sequence[Mapping[str, Any]]
    constants: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class Lineage:
    """What one stage run adds to the database: ``LineageDB.write`` records it in one
    transaction with the run's row."""

    artifacts: list[Artifact] = dataclasses.field(default_factory=list)
    details: list[Details] = dataclasses.field(default_factory=list)
    models: list[dict] = dataclasses.field(default_factory=list)  # zoo model sightings


@dataclass(frozen=True)
class DetailTable:
    """A detail table, declared once: its DDL and the writer's column lists follow from it.

    ``columns`` are DuckDB column definitions (``"name TYPE [NOT NULL]"``); ``required`` the
    columns every written row must bring; ``key`` the columns under which a row already
    present is not written again (so recording a stage twice adds nothing), also the table's
    primary key when ``primary_key``. JSON columns are written as JSON text.
    """

    name: str
    columns: tuple[str, ...]
    required: tuple[str, ...]
    key: tuple[str, ...]
    primary_key: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.split()[0] for c in self.columns)

    @property
    def json_columns(self) -> tuple[str, ...]:
        return tuple(c.split()[0] for c in self.columns if c.split()[1] == "JSON")

    @property
    def ddl(self) -> str:
        pk = [f"PRIMARY KEY ({', '.join(self.key)})"] if self.primary_key else []
        body = ",\n        ".join([*self.columns, *pk])
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n        {body}\n    )"


_SCORE = ("artifact_id VARCHAR NOT NULL", "task VARCHAR NOT NULL", "metric VARCHAR NOT NULL")
_PAIR = ("model_a VARCHAR NOT NULL", "model_b VARCHAR NOT NULL", "metric VARCHAR NOT NULL")

# What the stages' ``Details`` write, after a stage run's artifacts.
DETAIL_TABLES: dict[str, DetailTable] = {
    t.name: t
    for t in (
        # split: the documents a score was computed on ("test", "validation", or a task's
        # only split without the slice held out for selection: see model_glue/splits.py).
        # Scores are per run: a cached evaluation records them again for its flow run.
        DetailTable(
            "scores",
            (*_SCORE, "value DOUBLE", "stderr DOUBLE", "n_samples INTEGER", "eval_limit INTEGER",
             "run_id VARCHAR", "created_at TIMESTAMP NOT NULL", "split VARCHAR"),
            required=("artifact_id", "task", "metric", "value"),
            key=("artifact_id", "task", "metric", "run_id"),
        ),
        # scores on the proxy split: what selection (expert choice, the final model) read;
        # never shown as a leaderboard
        DetailTable(
            "proxy_scores",
            (*_SCORE, "value DOUBLE", "n_samples INTEGER", "eval_limit INTEGER",
             "split VARCHAR", "run_id VARCHAR", "created_at TIMESTAMP NOT NULL"),
            required=("artifact_id", "task", "metric", "value"),
            key=("artifact_id", "task", "metric", "run_id"),
        ),
        # the run's final model: the best of the mixture, the merged models and the zoo
        # models on the proxy split (never below the best single model there)
        DetailTable(
            "finals",
            ("selection_id VARCHAR NOT NULL", "artifact_id VARCHAR NOT NULL", "name VARCHAR",
             "kind VARCHAR", "proxy_mean DOUBLE", "best_single_id VARCHAR",
             "best_single_proxy_mean DOUBLE", "run_id VARCHAR", "created_at TIMESTAMP NOT NULL"),
            required=("selection_id", "artifact_id"),
            key=("selection_id", "run_id"),
        ),
        # via: 'sketch' (estimated from the models' sketches) or 'exact' (read from both
        # checkpoints); a pair refined exactly later keeps both rows
        DetailTable(
            "similarities",
            (*_PAIR, "tensor_set VARCHAR NOT NULL", "value DOUBLE", "run_id VARCHAR",
             "via VARCHAR"),
            required=("model_a", "model_b", "metric", "tensor_set", "value"),
            key=("model_a", "model_b", "metric", "tensor_set", "via"),
        ),
        # layer: parsed from names like model.layers.3.mlp... when a row brings none
        DetailTable(
            "tensor_similarities",
            (*_PAIR, "tensor VARCHAR NOT NULL", "layer INTEGER", "value DOUBLE", "run_id VARCHAR"),
            required=("model_a", "model_b", "metric", "tensor", "value"),
            key=("model_a", "model_b", "metric", "tensor"),
        ),
        DetailTable(
            "clusters",
            ("clustering_id VARCHAR NOT NULL", "cluster INTEGER NOT NULL",
             "model_fingerprint VARCHAR NOT NULL", "run_id VARCHAR"),
            required=("clustering_id", "cluster", "model_fingerprint"),
            key=("clustering_id", "model_fingerprint"),
        ),
        # the similarity threshold of each architecture group of a clustering: given, or
        # chosen by ``auto`` (the midpoint of the widest gap, gap_low..gap_high, among
        # pair_values)
        DetailTable(
            "cluster_thresholds",
            ("clustering_id VARCHAR NOT NULL", "arch_signature VARCHAR NOT NULL",
             "metric VARCHAR NOT NULL", "rule VARCHAR NOT NULL", "threshold DOUBLE NOT NULL",
             "gap_low DOUBLE", "gap_high DOUBLE", "n_pairs INTEGER NOT NULL", "pair_values JSON",
             "run_id VARCHAR"),
            required=("clustering_id", "arch_signature", "metric", "rule", "threshold", "n_pairs"),
            key=("clustering_id", "arch_signature"),
            primary_key=True,
        ),
        # where each zoo model came from, per run: 'path' (a directory), 'hub' (repo at a
        # revision, resolved to commit) or 'adapter' (a PEFT adapter, adapter_fingerprint,
        # applied to the zoo model base_fingerprint); a model may come from an adapter
        # that itself came from the hub
        DetailTable(
            "model_sources",
            ("fingerprint VARCHAR NOT NULL", "name VARCHAR NOT NULL", "source VARCHAR NOT NULL",
             "uri VARCHAR", "repo VARCHAR", "revision VARCHAR", "commit VARCHAR",
             "adapter_fingerprint VARCHAR", "base_fingerprint VARCHAR", "run_id VARCHAR"),
            required=("fingerprint", "name", "source"),
            key=("fingerprint", "name", "run_id"),
        ),
        # what each zoo_from query returned, in the hub's order (rank 0 first), per run
        DetailTable(
            "discoveries",
            ("base_model VARCHAR NOT NULL", "repo VARCHAR NOT NULL", "rank INTEGER NOT NULL",
             "query JSON", "run_id VARCHAR"),
            required=("base_model", "repo", "rank"),
            key=("base_model", "repo", "run_id"),
        ),
        DetailTable(
            "trials",
            ("search_id VARCHAR NOT NULL", "trial INTEGER NOT NULL", "strategy VARCHAR",
             "method VARCHAR", "coefficients JSON", "proxy_score DOUBLE", "seconds DOUBLE",
             "accepted BOOLEAN", "reason VARCHAR", "run_id VARCHAR"),
            required=("search_id", "trial", "proxy_score"),
            key=("search_id", "trial"),
        ),
    )
}  # fmt: skip
