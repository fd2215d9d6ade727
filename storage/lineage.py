"""The lineage and score database (DuckDB): what was computed, from what, by which code.

:class:`LineageDB` is the one object callers hold. Its parts, one job each:

- ``storage.db``: connections (one writer, readers in between), transactions, the schema
  and its migrations (``storage.schema``), and ``query`` for a user's own SQL;
- ``storage.records``: what a stage run records (``Lineage``, ``Artifact``, ``Details``)
  and the detail tables, each declared once;
- ``storage.writes``: flow runs, stage runs, models, artifacts, edges and detail rows;
- ``storage.queries``: the named questions of the CLI, ``glue report`` and ``glue plan``;
- ``storage.scores``: leaderboards and the run's headline.
"""

from __future__ import annotations

from storage.db import LineageError, default_lineage_path
from storage.queries import PreviousCall, Queries
from storage.records import DETAIL_TABLES, Artifact, Details, Lineage
from storage.scores import Headline, Scores
from storage.writes import Writes


class LineageDB(Writes, Queries, Scores):
    """Records and queries of the pipeline's lineage, runs and scores.

    ``path`` defaults to ``<GLUE_HOME>/lineage.duckdb``. ``lock_timeout_s`` bounds how long a
    call waits for another process to release the file before raising ``LineageLockedError``.
    A ``read_only`` instance (CLI reports, ``glue sql``) never writes nor creates the file.
    """


__all__ = [
    "DETAIL_TABLES",
    "Artifact",
    "Details",
    "Headline",
    "Lineage",
    "LineageDB",
    "LineageError",
    "PreviousCall",
    "default_lineage_path",
]
