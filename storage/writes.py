"""Writes to the lineage database: flow runs, stage runs, and what a stage run made.

The flow's recorder writes a stage run as :meth:`Writes.record_run` plus
:meth:`Writes.write` of the stage's :class:`~storage.records.Lineage`, in one transaction.
Detail rows go in as polars frames (Arrow), never row by row; the rows of a zoo model,
an artifact and its edges are few per stage run.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import polars as pl

from storage.db import Database, LineageError, naive_utc, run, to_json, utcnow
from storage.records import DETAIL_TABLES, Artifact, Lineage

RUN_END_STATUSES = ("completed", "cached", "reused", "failed")
FLOW_END_STATUSES = ("completed", "failed")


def _tensor_layer(df: pl.DataFrame) -> pl.DataFrame:
    """Per-tensor similarities: ``layer`` from names like ``model.layers.3.mlp...`` if absent."""
    if "layer" in df.columns and df["layer"].null_count() < df.height:
        return df
    layer = pl.col("tensor").str.extract(r"(?:^|\.)layers\.(\d+)\.", 1).cast(pl.Int32)
    return df.with_columns(layer.alias("layer"))


# columns some detail tables derive from others before insertion
_DERIVE = {"tensor_similarities": _tensor_layer}


class Writes(Database):
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
            run(
                con,
                "INSERT INTO flow_runs (flow_run_id, flow, config_hash, params, status, started_at) "
                "VALUES (?, ?, ?, ?, 'running', ?)",
                [flow_run_id, flow, config_hash, to_json(params), naive_utc(started_at)],
            )
        return flow_run_id

    def finish_flow_run(
        self,
        flow_run_id: str,
        status: str = "completed",
        error: str | None = None,
        *,
        finished_at: datetime | None = None,
    ) -> None:
        if status not in FLOW_END_STATUSES:
            raise LineageError(
                f"flow run status must be one of {FLOW_END_STATUSES}, not {status!r}"
            )
        with self._writer() as con:
            n = run(
                con,
                "UPDATE flow_runs SET status = ?, error = ?, finished_at = ? WHERE flow_run_id = ? RETURNING 1",
                [status, error, naive_utc(finished_at), flow_run_id],
            )
        if not n:
            raise LineageError(f"no flow run {flow_run_id!r} to finish")

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
        """Record a finished stage run: 'completed', 'cached' (a Prefect cache hit), 'reused'
        (the output was already in the store) or 'failed' (with ``error``); return its id."""
        if status not in RUN_END_STATUSES:
            raise LineageError(f"run status must be one of {RUN_END_STATUSES}, not {status!r}")
        run_id = run_id or uuid.uuid4().hex
        started, finished = naive_utc(started_at), naive_utc(finished_at)
        row = {
            "run_id": run_id,
            "flow_run_id": flow_run_id,
            "stage": stage,
            "code_version": code_version,
            "cache_key": cache_key,
            "params": to_json(params),
            "inputs": to_json(inputs),
            "outputs": to_json(list(outputs)) if outputs is not None else None,
            "status": status,
            "error": error,
            "host": host or socket.gethostname(),
            "worker": worker,
            "device": device,
            "started_at": started,
            "finished_at": finished,
            "seconds": (finished - started).total_seconds(),
            "key_parts": to_json(key_parts),
            "label": label,
        }
        with self._writer() as con:
            run(
                con,
                f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
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
        seen = naive_utc(seen_at)
        with self._writer() as con:
            run(
                con,
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET "
                "name = excluded.name, uri = excluded.uri, last_seen = greatest(models.last_seen, excluded.last_seen)",
                [fingerprint, name, uri, architecture, arch_signature, param_count, dtype]
                + [n_files, bytes, seen, seen],
            )
            # history: a row when a name starts pointing at different weights
            run(
                con,
                "INSERT INTO model_names SELECT ?, ?, ?, ? WHERE coalesce((SELECT fingerprint FROM model_names "
                "WHERE name = ? ORDER BY seen_at DESC LIMIT 1), '') <> ?",
                [name, fingerprint, uri, seen, name, fingerprint],
            )
            meta = {"architecture": architecture, "param_count": param_count, "dtype": dtype}
            self.record_artifact(
                Artifact(
                    fingerprint,
                    kind="model",
                    name=name,
                    uri=uri,
                    content_hash=fingerprint,
                    stage="zoo",
                    meta={k: v for k, v in meta.items() if v is not None},
                ),
                run_id,
                created_at=seen,
            )

    def record_artifact(
        self, a: Artifact, run_id: str | None = None, created_at: datetime | None = None
    ) -> bool:
        """Record a stage output and its parent edges (by role); True if it is new.

        Re-recording (a cache hit) keeps the producing run and time, so callers can use the
        result to record an artifact's details (scores, similarities) only once.
        """
        with self._writer() as con:
            row = run(con, "SELECT kind FROM artifacts WHERE artifact_id = ?", [a.artifact_id])
            if row and row[0][0] != a.kind:
                raise LineageError(
                    f"artifact {a.artifact_id} is recorded as kind {row[0][0]!r}, not {a.kind!r}"
                )
            run(
                con,
                "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (artifact_id) DO UPDATE SET "
                "name = coalesce(excluded.name, artifacts.name), uri = coalesce(excluded.uri, artifacts.uri)",
                [a.artifact_id, a.kind, a.name, a.uri, a.content_hash, a.stage]
                + [naive_utc(created_at), run_id, to_json(dict(a.meta or {}))],
            )
            by_role: dict[str, list[str]] = {}
            for parent, role in a.parents:
                by_role.setdefault(role, []).append(parent)
            for role, parents in by_role.items():
                self.record_edges(parents, a.artifact_id, run_id, role)
        return not row

    def record_edges(
        self, parents: Iterable[str], child: str, run_id: str | None, role: str = "input"
    ) -> int:
        """Parent artifacts -> ``child``; ``role`` says how a parent was used ('input', 'base', 'expert')."""
        unique = list(dict.fromkeys(parents))
        if child in unique:
            raise LineageError(f"artifact {child} cannot be its own parent")
        n = len(unique)
        df = pl.DataFrame(
            {
                "parent_id": unique,
                "child_id": [child] * n,
                "run_id": [run_id] * n,
                "role": [role] * n,
            },
            schema={c: pl.String for c in ("parent_id", "child_id", "run_id", "role")},
        )
        return self._insert_frame("edges", df, df.columns, on_conflict="ON CONFLICT DO NOTHING")

    # ---- details: table-driven, idempotent --------------------------------------------
    def insert_details(
        self,
        table: str,
        rows: Sequence[Mapping[str, Any]],
        run_id: str | None = None,
        **constants: Any,
    ) -> int:
        """Insert detail rows of ``table`` (see :data:`~storage.records.DETAIL_TABLES`);
        ``constants`` fill columns shared by every row. Rows whose key is already present are
        skipped, so recording an artifact's details again (a rerun after a crash) changes
        nothing."""
        spec = DETAIL_TABLES[table]
        rows = list(rows)
        if not rows:
            return 0
        df = pl.DataFrame(rows, infer_schema_length=None)
        constants = {"run_id": run_id, **constants}
        if "created_at" in spec.names:
            constants.setdefault("created_at", utcnow())
        for k, v in constants.items():
            if k not in df.columns or v is not None:
                df = df.with_columns(pl.lit(v).alias(k))
        missing = [c for c in spec.required if c not in df.columns]
        if missing:
            raise LineageError(
                f"records for table {table!r} lack column(s) {missing}; got {df.columns}"
            )
        df = df.with_columns([pl.lit(None).alias(c) for c in spec.names if c not in df.columns])
        for c in spec.json_columns:
            if df.schema[c] != pl.String:
                df = df.with_columns(
                    pl.Series(c, [to_json(v) for v in df[c].to_list()], dtype=pl.String)
                )
        if table in _DERIVE:
            df = _DERIVE[table](df)
        df = df.unique(subset=list(spec.key), keep="first", maintain_order=True)
        match = " AND ".join(f"t.{k} IS NOT DISTINCT FROM incoming.{k}" for k in spec.key)
        return self._insert_frame(
            table,
            df,
            spec.names,
            where=f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {match})",
        )

    def write(self, lineage: Lineage, run_id: str | None) -> None:
        """Everything one stage run produced, in one transaction: zoo model sightings,
        artifacts with their parent edges (by role) and detail rows."""
        with self._writer():
            for m in lineage.models:
                self.record_model(**m, run_id=run_id)
            for a in lineage.artifacts:
                self.record_artifact(a, run_id)
            for d in lineage.details:
                self.insert_details(d.table, d.rows, run_id, **d.constants)
