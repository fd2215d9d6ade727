"""Opening a DuckDB file the way the pipeline shares it.

DuckDB lets one process hold a read-write connection to a file, and then refuses every
other process outright, readers included. So the pipeline opens a connection per unit of
work, and whoever finds the file locked retries with backoff for a while before giving up
with an error that says what is going on. Inside one process DuckDB also refuses a
read-only connection while a read-write one is open, so connections to one file are
serialised by a per-process lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

READ_STATEMENTS = {
    duckdb.StatementType.SELECT,  # also WITH, DESCRIBE, SHOW, SUMMARIZE, FROM-first
    duckdb.StatementType.EXPLAIN,
    duckdb.StatementType.PRAGMA,
}

_process_locks: dict[str, threading.RLock] = {}
_process_locks_guard = threading.Lock()


class LineageLockedError(RuntimeError):
    """Another process held the lineage database for longer than the retry budget."""


class ReadOnlyQueryError(ValueError):
    """A statement given to a read-only query entry point would modify something."""


def _process_lock(path: Path) -> threading.RLock:
    with _process_locks_guard:
        return _process_locks.setdefault(str(path), threading.RLock())


def _is_lock_conflict(e: Exception) -> bool:
    text = str(e)
    return "Could not set lock" in text or "Conflicting lock" in text


@contextmanager
def connect(
    path: Path, *, read_only: bool, lock_timeout_s: float, external_access: bool = True
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``path``, retrying while another process holds its lock. Without
    ``external_access`` the connection reads this database only: DuckDB refuses files,
    globs, URLs and extensions (``read_csv('/etc/passwd')``, ``glob('/root/*')``)."""
    config = {} if external_access else {"enable_external_access": False}
    with _process_lock(path):
        deadline = time.monotonic() + lock_timeout_s
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(path), read_only=read_only, config=config)
                break
            except duckdb.IOException as e:
                if not _is_lock_conflict(e):
                    raise
                if time.monotonic() >= deadline:
                    raise LineageLockedError(
                        f"lineage database {path} is locked by another process (waited "
                        f"{lock_timeout_s:g} s): a pipeline run or a read-write session holds it. "
                        f"Retry when it finishes, or raise the lock timeout. DuckDB said: {e}"
                    ) from e
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)
        try:
            yield con
        finally:
            con.close()


def check_read_only_sql(sql: str) -> None:
    """Refuse anything but a single read statement, with a message naming what was refused.

    This is a courtesy for clear errors; the real guard is the ``read_only`` connection.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ReadOnlyQueryError(f"cannot parse query: {e}") from e
    if len(statements) != 1:
        raise ReadOnlyQueryError(f"give exactly one SQL statement (got {len(statements)})")
    if statements[0].type not in READ_STATEMENTS:
        raise ReadOnlyQueryError(
            f"only read statements are allowed here (SELECT, WITH, DESCRIBE, SHOW, PRAGMA, "
            f"EXPLAIN); got {statements[0].type.name}: {sql.strip()[:80]!r}"
        )
