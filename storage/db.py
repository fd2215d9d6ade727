"""The lineage database's connections: one writer, readers in between, the schema kept current.

One writer: the flow process. Tasks, wherever they run, return small records and the flow
records them. A connection is opened per unit of work and closed right after, so that a
read-only ``glue sql`` can slip in between writes; whoever meets the lock waits and retries
(see ``storage.connection``). Writes (``storage.writes``) and named queries
(``storage.queries``, ``storage.scores``) build on :class:`Database`; ``storage.LineageDB``
is all of them.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from model_glue.env import glue_home
from storage.connection import check_read_only_sql, connect
from storage.schema import MIGRATIONS, SCHEMA_VERSION, TABLES, VIEWS


class LineageError(ValueError):
    """A lookup or record that the lineage database cannot satisfy."""


def default_lineage_path() -> Path:
    """Where the lineage database lives unless a config or ``--db`` says otherwise."""
    return glue_home() / "lineage.duckdb"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(t: datetime | None) -> datetime:
    """``t`` as the naive UTC timestamp DuckDB stores (now when None)."""
    if t is None:
        return utcnow()
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def to_json(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, default=str)


def run(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> list:
    """Execute and drain: an unread result would block the connection for the next statement."""
    return con.execute(sql, params).fetchall()


class Database:
    """A DuckDB lineage file: connections, transactions and the schema.

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
        self.path = Path(path if path is not None else default_lineage_path()).absolute()
        self.read_only = read_only
        # False: queries read this database only (no files, globs, URLs); what glue sql uses
        self.external_access = external_access
        self.lock_timeout_s = lock_timeout_s
        self._schema_checked = False
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # ---- connections --------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Database]:
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

    # ---- schema ---------------------------------------------------------------------------
    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create a fresh schema, or migrate an older one step by step (see ``storage.schema``)."""
        con.begin()
        try:
            has_version = run(
                con,
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'",
            )[0][0]
            current = (
                run(con, "SELECT max(version) FROM schema_version")[0][0] if has_version else None
            )
            if current is not None and current > SCHEMA_VERSION:
                raise LineageError(
                    f"{self.path}: schema version {current} is newer than this code understands "
                    f"({SCHEMA_VERSION}); upgrade model-glue"
                )
            if current is None:
                for ddl in TABLES:
                    run(con, ddl)
                run(con, "INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, utcnow()])
            else:
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    if version not in MIGRATIONS:
                        raise LineageError(f"{self.path}: no migration to schema version {version}")
                    for stmt in MIGRATIONS[version]:
                        run(con, stmt)
                    run(con, "INSERT INTO schema_version VALUES (?, ?)", [version, utcnow()])
                for ddl in TABLES:
                    run(con, ddl)
            for ddl in VIEWS:
                run(con, ddl)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self._schema_checked = True

    def schema_version(self) -> int:
        return self._select("SELECT max(version) AS v FROM schema_version")["v"][0]

    # ---- reading and inserting ------------------------------------------------------------
    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> pl.DataFrame:
        """Run a user's read statement on a read-only connection (what ``glue sql`` calls);
        anything that would write is refused with ``ReadOnlyQueryError``."""
        check_read_only_sql(sql)
        return self._select(sql, params)

    def _select(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> pl.DataFrame:
        with self._reader() as con:
            rel = con.sql(sql, params=params)
            return rel.pl() if rel is not None else pl.DataFrame()

    def _insert_frame(
        self,
        table: str,
        df: pl.DataFrame,
        columns: Sequence[str],
        *,
        on_conflict: str = "",
        where: str = "",
    ) -> int:
        """Insert ``df``'s ``columns`` into ``table`` in one statement (Arrow, not row by row)."""
        if df.height == 0:
            return 0
        view = f"incoming_{uuid.uuid4().hex[:12]}"
        cols = ", ".join(columns)
        with self._writer() as con:
            con.register(view, df.select(columns))
            try:
                run(
                    con,
                    f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {view} AS incoming "
                    f"{where} {on_conflict}",
                )
            finally:
                # an aborted transaction refuses to unregister; keep the real error
                with suppress(duckdb.Error):
                    con.unregister(view)
        return df.height
