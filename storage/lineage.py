"""The lineage and score database (DuckDB): what was computed, from what, by which code.

One writer: the flow process. Tasks, wherever they run, return small records and the flow
records them here. A connection is opened per unit of work and closed right after, so that a
read-only ``glue sql`` can slip in between writes; whoever meets the lock waits and retries
(see ``storage.connection``). Batches go in as polars frames (Arrow), never row by row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from model_glue.env import glue_home
from storage.connection import check_read_only_sql, connect
from storage.schema import MIGRATIONS, SCHEMA_VERSION, TABLES, VIEWS

RUN_END_STATUSES = ("completed", "cached", "reused", "failed")
FLOW_END_STATUSES = ("completed", "failed")


class LineageError(ValueError):
    """A lookup or record that the lineage database cannot satisfy."""


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class Details:
    """Rows for one detail table (a key of :data:`DETAIL_TABLES`); ``constants`` fill
    columns every row shares."""

    table: str
    rows: Any
    constants: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Lineage:
    """What one stage run adds to the database: :meth:`LineageDB.write` records it in one
    transaction with the run's row."""

    artifacts: list[Artifact] = dataclasses.field(default_factory=list)
    details: list[Details] = dataclasses.field(default_factory=list)
    models: list[dict] = dataclasses.field(default_factory=list)  # zoo model sightings


@dataclasses.dataclass(frozen=True)
class DetailTable:
    """How rows reach a detail table: its columns, the ones a row must bring, the key under
    which a row already present is not inserted again, and JSON-encoded columns."""

    columns: tuple[str, ...]
    required: tuple[str, ...]
    key: tuple[str, ...]
    json_columns: tuple[str, ...] = ()
    prepare: Any = None  # frame -> frame, after validation


def _tensor_layer(df: pl.DataFrame) -> pl.DataFrame:
    if "layer" in df.columns and df["layer"].null_count() < df.height:
        return df
    layer = pl.col("tensor").str.extract(r"(?:^|\.)layers\.(\d+)\.", 1).cast(pl.Int32)
    return df.with_columns(layer.alias("layer"))


DETAIL_TABLES: dict[str, DetailTable] = {
    # scores are per run (a cached evaluation records them again for its flow run)
    "scores": DetailTable(
        (
            "artifact_id",
            "task",
            "metric",
            "value",
            "stderr",
            "n_samples",
            "eval_limit",
            "run_id",
            "created_at",
            "split",
        ),
        ("artifact_id", "task", "metric", "value"),
        key=("artifact_id", "task", "metric", "run_id"),
    ),
    "proxy_scores": DetailTable(
        (
            "artifact_id",
            "task",
            "metric",
            "value",
            "n_samples",
            "eval_limit",
            "split",
            "run_id",
            "created_at",
        ),
        ("artifact_id", "task", "metric", "value"),
        key=("artifact_id", "task", "metric", "run_id"),
    ),
    "finals": DetailTable(
        (
            "selection_id",
            "artifact_id",
            "name",
            "kind",
            "proxy_mean",
            "best_single_id",
            "best_single_proxy_mean",
            "run_id",
            "created_at",
        ),
        ("selection_id", "artifact_id"),
        key=("selection_id", "run_id"),
    ),
    "similarities": DetailTable(
        ("model_a", "model_b", "metric", "tensor_set", "value", "run_id"),
        ("model_a", "model_b", "metric", "tensor_set", "value"),
        key=("model_a", "model_b", "metric", "tensor_set"),
    ),
    "tensor_similarities": DetailTable(
        ("model_a", "model_b", "metric", "tensor", "layer", "value", "run_id"),
        ("model_a", "model_b", "metric", "tensor", "value"),
        key=("model_a", "model_b", "metric", "tensor"),
        prepare=_tensor_layer,
    ),
    "clusters": DetailTable(
        ("clustering_id", "cluster", "model_fingerprint", "run_id"),
        ("clustering_id", "cluster", "model_fingerprint"),
        key=("clustering_id", "model_fingerprint"),
    ),
    "cluster_thresholds": DetailTable(
        (
            "clustering_id",
            "arch_signature",
            "metric",
            "rule",
            "threshold",
            "gap_low",
            "gap_high",
            "n_pairs",
            "pair_values",
            "run_id",
        ),
        ("clustering_id", "arch_signature", "metric", "rule", "threshold", "n_pairs"),
        key=("clustering_id", "arch_signature"),
        json_columns=("pair_values",),
    ),
    "trials": DetailTable(
        (
            "search_id",
            "trial",
            "strategy",
            "method",
            "coefficients",
            "proxy_score",
            "seconds",
            "accepted",
            "reason",
            "run_id",
        ),
        ("search_id", "trial", "proxy_score"),
        key=("search_id", "trial"),
        json_columns=("coefficients",),
    ),
}


def cluster_rows(
    assignments: Mapping[str, int] | Sequence[Sequence[str]] | pl.DataFrame,
) -> pl.DataFrame:
    """``{fingerprint: cluster}`` or a list of member lists as ``clusters`` rows."""
    if isinstance(assignments, pl.DataFrame):
        return assignments
    if isinstance(assignments, Sequence) and not isinstance(assignments, str):
        assignments = {fp: i for i, members in enumerate(assignments) for fp in members}
    return pl.DataFrame(
        {"model_fingerprint": list(assignments), "cluster": [int(c) for c in assignments.values()]},
        schema={"model_fingerprint": pl.String, "cluster": pl.Int32},
    )


def threshold_rows(thresholds: Iterable[Mapping[str, Any]]) -> list[dict]:
    """A clustering record's per-architecture thresholds as ``cluster_thresholds`` rows."""
    return [
        {
            "arch_signature": t["arch_signature"],
            "rule": t["rule"],
            "threshold": float(t["threshold"]),
            "gap_low": t.get("gap_low"),
            "gap_high": t.get("gap_high"),
            "n_pairs": len(t.get("values", ())),
            "pair_values": list(t.get("values", ())),
        }
        for t in thresholds
    ]


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _naive_utc(t: datetime | None) -> datetime:
    if t is None:
        return utcnow()
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def _json(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, default=str)


def _run(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None
) -> list[tuple]:
    """Execute and drain: an unread result would block the connection for the next statement."""
    return con.execute(sql, params).fetchall()


def _rows(records: pl.DataFrame | Iterable[Mapping[str, Any] | Any]) -> pl.DataFrame:
    """Accept a frame, a list of dicts or a list of dataclasses (e.g. evaluation ``Score`` objects)."""
    if isinstance(records, pl.DataFrame):
        return records
    rows = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in records]
    return pl.DataFrame(rows, infer_schema_length=None)


class LineageDB:
    """Records and queries of the pipeline's lineage, runs and scores.

    ``path`` defaults to ``<GLUE_HOME>/lineage.duckdb``. ``lock_timeout_s`` bounds how long a
    call waits for another process to release the file before raising ``LineageLockedError``.
    A ``read_only`` instance (CLI reports, ``glue sql``) never writes nor creates the file.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        read_only: bool = False,
        lock_timeout_s: float = 30.0,
        external_access: bool = True,
    ) -> None:
        self.path = Path(path if path is not None else glue_home() / "lineage.duckdb").absolute()
        self.read_only = read_only
        # False: queries read this database only (no files, globs, URLs); what glue sql uses
        self.external_access = external_access
        self.lock_timeout_s = lock_timeout_s
        self._schema_checked = False
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"LineageDB({str(self.path)!r})"

    # ---- connections --------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[LineageDB]:
        """Group several records into one atomic write (one connection, one commit).

        Record calls made inside (on this thread) share the transaction; on an exception
        nothing of it is kept. Outside a ``transaction`` each record call is its own.
        """
        with self._writer():
            yield self

    @contextmanager
    def _writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        active = getattr(self._local, "con", None)
        if active is not None:
            yield active
            return
        if self.read_only:
            raise LineageError(f"lineage database {self.path} was opened read-only; cannot record")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with connect(self.path, read_only=False, lock_timeout_s=self.lock_timeout_s) as con:
            if not self._schema_checked:
                self._ensure_schema(con)
            con.begin()
            self._local.con = con
            try:
                yield con
                con.commit()
            except BaseException:
                con.rollback()
                raise
            finally:
                self._local.con = None

    @contextmanager
    def _reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        # inside our own write transaction, or a reader already open on this thread: share it
        active = getattr(self._local, "con", None) or getattr(self._local, "read_con", None)
        if active is not None:
            yield active
            return
        if not self.path.exists():
            if self.read_only:
                raise LineageError(f"no lineage database at {self.path} (nothing recorded yet)")
            with self._writer():  # creates the file with its schema, so queries see the tables
                pass
        with connect(
            self.path,
            read_only=True,
            lock_timeout_s=self.lock_timeout_s,
            external_access=self.external_access,
        ) as con:
            self._local.read_con = con
            try:
                yield con
            finally:
                self._local.read_con = None

    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create a fresh schema, or migrate an older one step by step (see ``storage.schema``)."""
        con.begin()
        try:
            has_version = _run(
                con,
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'",
            )[0][0]
            current = (
                _run(con, "SELECT max(version) FROM schema_version")[0][0] if has_version else None
            )
            if current is not None and current > SCHEMA_VERSION:
                raise LineageError(
                    f"{self.path}: schema version {current} is newer than this code understands "
                    f"({SCHEMA_VERSION}); upgrade model-glue"
                )
            if current is None:
                for ddl in TABLES:
                    _run(con, ddl)
                _run(con, "INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, utcnow()])
            else:
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    if version not in MIGRATIONS:
                        raise LineageError(f"{self.path}: no migration to schema version {version}")
                    for stmt in MIGRATIONS[version]:
                        _run(con, stmt)
                    _run(con, "INSERT INTO schema_version VALUES (?, ?)", [version, utcnow()])
                for ddl in TABLES:
                    _run(con, ddl)
            for ddl in VIEWS:
                _run(con, ddl)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self._schema_checked = True

    def schema_version(self) -> int:
        with self._reader() as con:
            return _run(con, "SELECT max(version) FROM schema_version")[0][0]

    def _insert_frame(
        self,
        table: str,
        df: pl.DataFrame,
        columns: Sequence[str],
        *,
        on_conflict: str = "",
        where: str = "",
    ) -> int:
        if df.height == 0:
            return 0
        view = f"incoming_{uuid.uuid4().hex[:12]}"
        cols = ", ".join(columns)
        with self._writer() as con:
            con.register(view, df.select(columns))
            try:
                _run(
                    con,
                    f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {view} AS incoming "
                    f"{where} {on_conflict}",
                )
            finally:
                # an aborted transaction refuses to unregister; keep the real error
                with suppress(duckdb.Error):
                    con.unregister(view)
        return df.height

    @staticmethod
    def _frame(
        table: str,
        records: pl.DataFrame | Iterable[Mapping[str, Any] | Any],
        required: Sequence[str],
        optional: Sequence[str] = (),
        constants: Mapping[str, Any] | None = None,
        json_columns: Sequence[str] = (),
    ) -> pl.DataFrame:
        """Validate a batch for ``table``: required columns present, optional ones filled with nulls."""
        df = _rows(records)
        if df.height == 0:
            return df
        for k, v in (constants or {}).items():
            if k not in df.columns or v is not None:
                df = df.with_columns(pl.lit(v).alias(k))
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise LineageError(
                f"records for table {table!r} lack column(s) {missing}; got {df.columns}"
            )
        for c in optional:
            if c not in df.columns:
                df = df.with_columns(pl.lit(None).alias(c))
        for c in json_columns:
            if c in df.columns and df.schema[c] != pl.String:
                df = df.with_columns(
                    pl.Series(c, [_json(v) for v in df[c].to_list()], dtype=pl.String)
                )
        return df

    # ---- flow runs and stage runs -----------------------------------------------------
    def start_flow_run(
        self,
        flow_run_id: str | None = None,
        *,
        flow: str,
        config_hash: str | None = None,
        params: Mapping[str, Any] | None = None,
        started_at: datetime | None = None,
    ) -> str:
        """Open a flow run (Prefect's flow run id, or a fresh one); return its id."""
        flow_run_id = flow_run_id or uuid.uuid4().hex
        with self._writer() as con:
            _run(
                con,
                "INSERT INTO flow_runs (flow_run_id, flow, config_hash, params, status, started_at) "
                "VALUES (?, ?, ?, ?, 'running', ?)",
                [flow_run_id, flow, config_hash, _json(params), _naive_utc(started_at)],
            )
        return flow_run_id

    def finish_flow_run(
        self, flow_run_id: str, status: str = "completed", error: str | None = None
    ) -> None:
        if status not in FLOW_END_STATUSES:
            raise LineageError(
                f"flow run status must be one of {FLOW_END_STATUSES}, not {status!r}"
            )
        with self._writer() as con:
            n = _run(
                con,
                "UPDATE flow_runs SET status = ?, error = ?, finished_at = ? WHERE flow_run_id = ? RETURNING 1",
                [status, error, utcnow(), flow_run_id],
            )
        if not n:
            raise LineageError(f"no flow run {flow_run_id!r} to finish")

    def start_run(
        self,
        stage: str,
        *,
        code_version: str | None = None,
        cache_key: str | None = None,
        params: Mapping[str, Any] | None = None,
        inputs: Sequence[str] | Mapping[str, Any] | None = None,
        flow_run_id: str | None = None,
        run_id: str | None = None,
        started_at: datetime | None = None,
        host: str | None = None,
        worker: str | None = None,
        device: str | None = None,
        key_parts: Any = None,
        label: str | None = None,
    ) -> str:
        """Open a stage run (status 'running'); close it with :meth:`finish_run`."""
        run_id = run_id or uuid.uuid4().hex
        with self._writer() as con:
            _run(
                con,
                "INSERT INTO runs (run_id, flow_run_id, stage, code_version, cache_key, params, inputs, "
                "status, host, worker, device, started_at, key_parts, label) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    flow_run_id,
                    stage,
                    code_version,
                    cache_key,
                    _json(params),
                    _json(inputs),
                    host or socket.gethostname(),
                    worker,
                    device,
                    _naive_utc(started_at),
                    _json(key_parts),
                    label,
                ],
            )
        return run_id

    def finish_run(
        self,
        run_id: str,
        status: str,
        error: str | None = None,
        *,
        outputs: Sequence[str] | None = None,
        finished_at: datetime | None = None,
    ) -> None:
        """Close a stage run: 'completed', 'cached' (a Prefect cache hit), 'reused' (the
        output was already in the store) or 'failed' (with ``error``)."""
        if status not in RUN_END_STATUSES:
            raise LineageError(f"run status must be one of {RUN_END_STATUSES}, not {status!r}")
        with self._writer() as con:
            found = _run(
                con,
                "UPDATE runs SET status = ?, error = ?, outputs = coalesce(?, outputs), finished_at = ?, "
                "seconds = date_diff('microsecond', started_at, ?) / 1e6 WHERE run_id = ? RETURNING 1",
                [
                    status,
                    error,
                    _json(list(outputs)) if outputs is not None else None,
                    _naive_utc(finished_at),
                    _naive_utc(finished_at),
                    run_id,
                ],
            )
        if not found:
            raise LineageError(f"no run {run_id!r} to finish")

    def record_run(
        self,
        stage: str,
        *,
        status: str,
        started_at: datetime,
        finished_at: datetime,
        code_version: str | None = None,
        cache_key: str | None = None,
        params: Mapping[str, Any] | None = None,
        inputs: Sequence[str] | Mapping[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
        error: str | None = None,
        flow_run_id: str | None = None,
        run_id: str | None = None,
        host: str | None = None,
        worker: str | None = None,
        device: str | None = None,
        key_parts: Any = None,
        label: str | None = None,
    ) -> str:
        """Record a finished run in one call: for records returned by remote workers, and cache hits."""
        with self._writer():
            run_id = self.start_run(
                stage,
                code_version=code_version,
                cache_key=cache_key,
                params=params,
                inputs=inputs,
                flow_run_id=flow_run_id,
                run_id=run_id,
                started_at=started_at,
                host=host,
                worker=worker,
                device=device,
                key_parts=key_parts,
                label=label,
            )
            self.finish_run(run_id, status, error, outputs=outputs, finished_at=finished_at)
        return run_id

    # ---- models, artifacts, edges -------------------------------------------------------
    def record_model(
        self,
        fingerprint: str,
        *,
        name: str,
        uri: str,
        architecture: str | None = None,
        arch_signature: str | None = None,
        param_count: int | None = None,
        dtype: str | None = None,
        n_files: int | None = None,
        bytes: int | None = None,
        run_id: str | None = None,
        seen_at: datetime | None = None,
    ) -> None:
        """Record a zoo model sighting: the model row, the name history and its artifact row."""
        seen = _naive_utc(seen_at)
        with self._writer() as con:
            _run(
                con,
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET "
                "name = excluded.name, uri = excluded.uri, last_seen = greatest(models.last_seen, excluded.last_seen)",
                [
                    fingerprint,
                    name,
                    uri,
                    architecture,
                    arch_signature,
                    param_count,
                    dtype,
                    n_files,
                    bytes,
                    seen,
                    seen,
                ],
            )
            # history: a row when a name starts pointing at different weights
            _run(
                con,
                "INSERT INTO model_names SELECT ?, ?, ?, ? WHERE coalesce((SELECT fingerprint FROM model_names "
                "WHERE name = ? ORDER BY seen_at DESC LIMIT 1), '') <> ?",
                [name, fingerprint, uri, seen, name, fingerprint],
            )
            self.record_artifact(
                fingerprint,
                kind="model",
                name=name,
                uri=uri,
                content_hash=fingerprint,
                stage="zoo",
                run_id=run_id,
                created_at=seen,
                meta={
                    k: v
                    for k, v in {
                        "architecture": architecture,
                        "param_count": param_count,
                        "dtype": dtype,
                    }.items()
                    if v is not None
                },
            )

    def record_artifact(
        self,
        artifact_id: str,
        *,
        kind: str,
        name: str | None = None,
        uri: str | None = None,
        content_hash: str | None = None,
        stage: str | None = None,
        run_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
        created_at: datetime | None = None,
        parents: Iterable[str] = (),
        role: str = "input",
    ) -> bool:
        """Record a stage output and its ``parents`` (edges with ``role``); True if it is new.

        Re-recording (a cache hit) keeps the producing run and time, so callers can use the
        result to record an artifact's details (scores, similarities) only once.
        """
        with self._writer() as con:
            row = _run(con, "SELECT kind FROM artifacts WHERE artifact_id = ?", [artifact_id])
            if row and row[0][0] != kind:
                raise LineageError(
                    f"artifact {artifact_id} is recorded as kind {row[0][0]!r}, not {kind!r}"
                )
            _run(
                con,
                "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (artifact_id) DO UPDATE SET "
                "name = coalesce(excluded.name, artifacts.name), uri = coalesce(excluded.uri, artifacts.uri)",
                [
                    artifact_id,
                    kind,
                    name,
                    uri,
                    content_hash,
                    stage,
                    _naive_utc(created_at),
                    run_id,
                    _json(dict(meta or {})),
                ],
            )
            parents = list(parents)
            if parents:
                self.record_edges(parents, artifact_id, run_id, role)
        return not row

    def record_edges(
        self, parents: Iterable[str], child: str, run_id: str | None, role: str = "input"
    ) -> int:
        """Parent artifacts -> ``child``; ``role`` says how a parent was used ('input', 'base', 'expert')."""
        unique = list(dict.fromkeys(parents))
        if child in unique:
            raise LineageError(f"artifact {child} cannot be its own parent")
        df = pl.DataFrame(
            {
                "parent_id": unique,
                "child_id": [child] * len(unique),
                "run_id": [run_id] * len(unique),
                "role": [role] * len(unique),
            },
            schema={
                "parent_id": pl.String,
                "child_id": pl.String,
                "run_id": pl.String,
                "role": pl.String,
            },
        )
        return self._insert_frame("edges", df, df.columns, on_conflict="ON CONFLICT DO NOTHING")

    # ---- details: table-driven, idempotent --------------------------------------------
    def insert_details(
        self,
        table: str,
        rows: pl.DataFrame | Iterable[Mapping[str, Any] | Any],
        run_id: str | None = None,
        **constants: Any,
    ) -> int:
        """Insert detail rows of ``table`` (see :data:`DETAIL_TABLES`); ``constants`` fill
        columns shared by every row. Rows whose key is already present are skipped, so
        recording an artifact's details again (a rerun after a crash) changes nothing."""
        spec = DETAIL_TABLES[table]
        if "created_at" in spec.columns:
            constants.setdefault("created_at", utcnow())
        df = self._frame(
            table,
            rows,
            spec.required,
            [c for c in spec.columns if c not in spec.required],
            {"run_id": run_id, **constants},
            json_columns=spec.json_columns,
        )
        if df.height == 0:
            return 0
        if spec.prepare is not None:
            df = spec.prepare(df)
        df = df.unique(subset=list(spec.key), keep="first", maintain_order=True)
        match = " AND ".join(f"t.{k} IS NOT DISTINCT FROM incoming.{k}" for k in spec.key)
        return self._insert_frame(
            table,
            df,
            spec.columns,
            where=f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {match})",
        )

    def write(self, lineage: Lineage, run_id: str | None) -> None:
        """Everything one stage run produced, in one transaction: zoo model sightings,
        artifacts with their parent edges (by role) and detail rows."""
        with self._writer():
            for m in lineage.models:
                self.record_model(**m, run_id=run_id)
            for a in lineage.artifacts:
                self.record_artifact(
                    a.artifact_id,
                    kind=a.kind,
                    name=a.name,
                    uri=a.uri,
                    content_hash=a.content_hash,
                    stage=a.stage,
                    run_id=run_id,
                    meta=a.meta,
                )
                by_role: dict[str, list[str]] = {}
                for parent, role in a.parents:
                    by_role.setdefault(role, []).append(parent)
                for role, parents in by_role.items():
                    self.record_edges(parents, a.artifact_id, run_id, role)
            for d in lineage.details:
                self.insert_details(d.table, d.rows, run_id, **d.constants)

    def record_scores(
        self,
        artifact_id: str,
        run_id: str | None,
        scores: pl.DataFrame | Iterable[Mapping[str, Any] | Any],
        eval_limit: int | None = None,
    ) -> int:
        """Scores of one artifact: rows with task, metric, value and optionally stderr, n_samples."""
        return self.insert_details(
            "scores",
            scores,
            run_id,
            artifact_id=artifact_id,
            eval_limit=eval_limit,
            created_at=utcnow(),
        )

    def record_similarities(
        self, df: pl.DataFrame | Iterable[Mapping[str, Any]], run_id: str | None = None
    ) -> int:
        return self.insert_details("similarities", df, run_id)

    def record_tensor_similarities(
        self, df: pl.DataFrame | Iterable[Mapping[str, Any]], run_id: str | None = None
    ) -> int:
        """Per-tensor similarity; ``layer`` is parsed from names like ``model.layers.3.mlp...`` if absent."""
        return self.insert_details("tensor_similarities", df, run_id)

    def record_clusters(
        self,
        clustering_id: str,
        assignments: Mapping[str, int] | Sequence[Sequence[str]] | pl.DataFrame,
        run_id: str | None = None,
    ) -> int:
        """Cluster membership: ``{model_fingerprint: cluster}``, a list of member lists (the
        cluster number is the position) or a frame with ``model_fingerprint`` and ``cluster``."""
        return self.insert_details(
            "clusters", cluster_rows(assignments), run_id, clustering_id=clustering_id
        )

    def record_thresholds(
        self,
        clustering_id: str,
        metric: str,
        thresholds: Iterable[Mapping[str, Any]],
        run_id: str | None = None,
    ) -> int:
        """One row per architecture group: ``arch_signature``, ``threshold``, ``rule`` and,
        for ``auto``, the gap and the pairwise values it was chosen from (idempotent)."""
        return self.insert_details(
            "cluster_thresholds",
            threshold_rows(thresholds),
            run_id,
            clustering_id=clustering_id,
            metric=metric,
        )

    def record_trials(
        self, df: pl.DataFrame | Iterable[Mapping[str, Any]], run_id: str | None = None
    ) -> int:
        """Coefficient-search trials; ``coefficients`` may be lists/dicts (stored as JSON)."""
        return self.insert_details("trials", df, run_id)

    # ---- queries --------------------------------------------------------------------------
    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> pl.DataFrame:
        """Run one read statement on a read-only connection (what ``glue sql`` calls)."""
        check_read_only_sql(sql)
        return self._select(sql, params)

    def _select(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> pl.DataFrame:
        with self._reader() as con:
            rel = con.sql(sql, params=params)
            return rel.pl() if rel is not None else pl.DataFrame()

    def resolve(self, ref: str) -> str:
        """Artifact id from a full id, a name (its latest artifact) or a unique id prefix."""
        ref = ref.strip()
        if not ref:
            raise LineageError("empty artifact reference")
        with self._reader():  # one connection for the three lookups
            return self._resolve(ref)

    def _resolve(self, ref: str) -> str:
        exact = self._select("SELECT artifact_id FROM artifacts WHERE artifact_id = ?", [ref])
        if exact.height:
            return ref
        by_name = self._select(
            """SELECT artifact_id, max(t) AS t FROM (
                   SELECT artifact_id, created_at AS t FROM artifacts WHERE name = $1
                   UNION ALL SELECT fingerprint, seen_at FROM model_names WHERE name = $1)
               GROUP BY artifact_id ORDER BY t DESC, artifact_id LIMIT 1""",
            [ref],
        )
        if by_name.height:
            return by_name["artifact_id"][0]
        by_prefix = self._select(
            "SELECT artifact_id, kind, name FROM artifacts WHERE starts_with(artifact_id, ?) ORDER BY artifact_id LIMIT 6",
            [ref],
        )
        if by_prefix.height == 1:
            return by_prefix["artifact_id"][0]
        if by_prefix.height > 1:
            shown = ", ".join(
                f"{r['artifact_id'][:16]} ({r['kind']} {r['name']})"
                for r in by_prefix.head(5).iter_rows(named=True)
            )
            raise LineageError(
                f"artifact reference {ref!r} is ambiguous; it matches {shown}{' ...' if by_prefix.height > 5 else ''}"
            )
        raise LineageError(
            f"no artifact named {ref!r} or with an id starting with it in {self.path}"
        )

    def _walk(self, ref: str, *, up: bool) -> pl.DataFrame:
        with self._reader():
            return self._walk_from(self.resolve(ref), up=up)

    def _walk_from(self, artifact_id: str, *, up: bool) -> pl.DataFrame:
        # No depth column inside the recursion: UNION deduplicates ids, which keeps the walk
        # linear in the graph size (a depth column makes every path distinct).
        start, nxt = ("child_id", "parent_id") if up else ("parent_id", "child_id")
        return self._select(
            f"""WITH RECURSIVE walk(id) AS (
                    SELECT {nxt} FROM edges WHERE {start} = ?
                    UNION
                    SELECT e.{nxt} FROM edges e JOIN walk w ON e.{start} = w.id)
                SELECT w.id AS artifact_id, a.kind, a.name, a.uri, a.stage, a.created_at, a.run_id
                FROM walk w LEFT JOIN artifacts a ON a.artifact_id = w.id
                WHERE w.id <> ?
                ORDER BY a.created_at, w.id""",
            [artifact_id, artifact_id],
        )

    def ancestors(self, ref: str) -> pl.DataFrame:
        """Every artifact that ``ref`` was derived from, transitively (zoo models included)."""
        return self._walk(ref, up=True)

    def descendants(self, ref: str) -> pl.DataFrame:
        """Every artifact derived from ``ref``, transitively."""
        return self._walk(ref, up=False)

    def run_thresholds(self, flow_run_id: str) -> pl.DataFrame:
        """The similarity threshold of each architecture group, as the flow run's
        clustering chose it (rule, value, the gap it sits in, pairs it was chosen from)."""
        return self.query(
            "SELECT t.arch_signature, t.metric, t.rule, t.threshold, t.gap_low, t.gap_high, "
            "t.n_pairs FROM cluster_thresholds t WHERE t.clustering_id IN ("
            "  SELECT json_extract_string(r.outputs, '$[0]') FROM runs r"
            "  WHERE r.flow_run_id = ? AND r.stage = 'cluster' AND r.status != 'failed')"
            " ORDER BY t.arch_signature",
            [flow_run_id],
        )

    def leaderboard(
        self, flow_run_id: str | None = None, metrics: Mapping[str, str] | None = None
    ) -> pl.DataFrame:
        """Latest score per artifact and task, one column per task, plus their mean; best first.

        ``metrics`` picks one metric per task (``{"arc_challenge": "acc_norm"}``); a task with
        several recorded metrics and no choice gets one column per metric, ``task:metric``.
        With ``flow_run_id``, only scores recorded by that flow run count.
        """
        where, params = ("WHERE flow_run_id = ?", [flow_run_id]) if flow_run_id else ("", [])
        latest = self._select(
            f"""SELECT artifact_id, name, kind, task, metric, value FROM v_scores {where}
                QUALIFY row_number() OVER (PARTITION BY artifact_id, task, metric
                                           ORDER BY created_at DESC, run_id DESC) = 1""",
            params,
        )
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
        columns = sorted(latest["column"].unique().to_list())
        wide = latest.pivot(
            on="column",
            index=["artifact_id", "name", "kind"],
            values="value",
            aggregate_function="first",
        )
        wide = wide.select(["artifact_id", "name", "kind", *columns])
        finals = self.final_ids(flow_run_id) if flow_run_id else []
        return wide.with_columns(
            pl.mean_horizontal(columns).alias("mean"),
            pl.sum_horizontal([pl.col(c).is_not_null() for c in columns]).alias("n_tasks"),
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
