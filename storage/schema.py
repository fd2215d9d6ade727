"""DDL of the lineage database: tables, views and the migration hook.

Table and column names are part of the user interface (``glue sql``), so they stay plain.
All timestamps are UTC. JSON columns hold parameters and input/output lists verbatim, so
that ``glue plan`` can tell which input, code version or parameter changed.

To change the schema: bump ``SCHEMA_VERSION``, edit the ``CREATE`` statements here or the
detail tables' declarations in ``storage/records.py`` (what a fresh database gets) and add
the statements that bring an existing database from version N-1 to N under
``MIGRATIONS[N]``.
"""

from __future__ import annotations

from storage.records import DETAIL_TABLES

SCHEMA_VERSION = 7

# the runs table as schema version 2 made it (what migration 2 rebuilds; frozen)
RUNS_TABLE_V2 = """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        flow_run_id VARCHAR,
        stage VARCHAR NOT NULL,
        code_version VARCHAR,
        cache_key VARCHAR,
        params JSON,
        inputs JSON,
        outputs JSON,
        status VARCHAR NOT NULL CHECK (status IN ('running', 'completed', 'cached', 'reused', 'failed')),
        error VARCHAR,
        host VARCHAR,
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        seconds DOUBLE
    )"""

# A stage run's status: 'cached' is a Prefect cache hit, 'reused' a run whose stage found
# its output already complete in the artifact store (Prefect's result was gone) and did
# no work, 'completed' one that computed its output ('running': only in databases
# of older versions, which opened a run before closing it).
# host: the machine a stage ran on; worker: the Dask worker (or process) that ran it;
# device: the device its models were on (cpu, cuda:0, ...); key_parts: the identity the
# run's cache key was hashed from and label the call's name for people (what `glue plan`
# compares to say why a call is stale)
RUNS_TABLE = """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        flow_run_id VARCHAR,
        stage VARCHAR NOT NULL,
        code_version VARCHAR,
        cache_key VARCHAR,
        params JSON,
        inputs JSON,
        outputs JSON,
        status VARCHAR NOT NULL CHECK (status IN ('running', 'completed', 'cached', 'reused', 'failed')),
        error VARCHAR,
        host VARCHAR,
        worker VARCHAR,
        device VARCHAR,
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        seconds DOUBLE,
        key_parts JSON,
        label VARCHAR
    )"""


TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER NOT NULL,
        applied_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS flow_runs (
        flow_run_id VARCHAR PRIMARY KEY,
        flow VARCHAR NOT NULL,
        config_hash VARCHAR,
        params JSON,
        status VARCHAR NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
        error VARCHAR,
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP
    )""",
    RUNS_TABLE,
    """CREATE TABLE IF NOT EXISTS models (
        fingerprint VARCHAR PRIMARY KEY,
        name VARCHAR,
        uri VARCHAR,
        architecture VARCHAR,
        arch_signature VARCHAR,
        param_count BIGINT,
        dtype VARCHAR,
        n_files INTEGER,
        bytes BIGINT,
        first_seen TIMESTAMP NOT NULL,
        last_seen TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS model_names (
        name VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL,
        uri VARCHAR,
        seen_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS artifacts (
        artifact_id VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL,
        name VARCHAR,
        uri VARCHAR,
        content_hash VARCHAR,
        stage VARCHAR,
        created_at TIMESTAMP NOT NULL,
        run_id VARCHAR,
        meta JSON
    )""",
    """CREATE TABLE IF NOT EXISTS edges (
        parent_id VARCHAR NOT NULL,
        child_id VARCHAR NOT NULL,
        run_id VARCHAR,
        role VARCHAR NOT NULL,
        PRIMARY KEY (parent_id, child_id, role)
    )""",
    *(t.ddl for t in DETAIL_TABLES.values()),
)

# The score that counts for an artifact, task and metric: the latest. ``v_leaderboard``
# applies it to every score, ``LineageDB.leaderboard`` to one flow run's.
LATEST_SCORE = """QUALIFY row_number() OVER (PARTITION BY artifact_id, task, metric
                               ORDER BY created_at DESC, run_id DESC) = 1"""

# Views are recreated on every schema check, so editing them needs no migration.
VIEWS: tuple[str, ...] = (
    # every score with the names a reader wants, and the flow run that produced it
    """CREATE OR REPLACE VIEW v_scores AS
    SELECT s.artifact_id, a.name, a.kind, s.task, s.metric, s.value, s.stderr, s.n_samples,
           s.eval_limit, s.split, s.run_id, r.flow_run_id, s.created_at
    FROM scores s
    LEFT JOIN artifacts a ON a.artifact_id = s.artifact_id
    LEFT JOIN runs r ON r.run_id = s.run_id""",
    # final: the artifact is the final model chosen by the flow run that recorded the score
    """CREATE OR REPLACE VIEW v_leaderboard AS
    SELECT v.*, EXISTS (SELECT 1 FROM finals f JOIN runs fr ON fr.run_id = f.run_id
                        WHERE f.artifact_id = v.artifact_id
                          AND fr.flow_run_id = v.flow_run_id) AS final
    FROM v_scores v
    """
    + LATEST_SCORE,
    """CREATE OR REPLACE VIEW v_lineage AS
    SELECT e.parent_id, p.name AS parent_name, p.kind AS parent_kind, e.role,
           e.child_id, c.name AS child_name, c.kind AS child_kind,
           e.run_id, r.stage, r.flow_run_id
    FROM edges e
    LEFT JOIN artifacts p ON p.artifact_id = e.parent_id
    LEFT JOIN artifacts c ON c.artifact_id = e.child_id
    LEFT JOIN runs r ON r.run_id = e.run_id""",
    # every (ancestor, descendant) pair of the artifact graph, with names and kinds: "which
    # merges and mixtures contain model X", "scores of everything made from X"
    """CREATE OR REPLACE VIEW v_descendants AS
    WITH RECURSIVE walk(ancestor_id, descendant_id) AS (
        SELECT parent_id, child_id FROM edges
        UNION
        SELECT w.ancestor_id, e.child_id FROM walk w JOIN edges e ON e.parent_id = w.descendant_id)
    SELECT w.ancestor_id, a.name AS ancestor_name, a.kind AS ancestor_kind,
           w.descendant_id, d.name AS descendant_name, d.kind AS descendant_kind
    FROM walk w
    LEFT JOIN artifacts a ON a.artifact_id = w.ancestor_id
    LEFT JOIN artifacts d ON d.artifact_id = w.descendant_id""",
    # the stage calls of each flow run by cache key: two runs differ exactly where one
    # holds a (stage, cache_key) the other lacks
    """CREATE OR REPLACE VIEW v_flow_run_calls AS
    SELECT r.flow_run_id, f.started_at AS flow_started_at, r.stage, r.cache_key, r.status,
           r.code_version, r.outputs
    FROM runs r JOIN flow_runs f ON f.flow_run_id = r.flow_run_id
    WHERE r.cache_key IS NOT NULL""",
    # per completed flow run, task and metric: the best scored artifact (ties: by name)
    """CREATE OR REPLACE VIEW v_best_per_task AS
    SELECT f.started_at AS flow_started_at, s.flow_run_id, s.task, s.metric, s.name, s.kind,
           s.value
    FROM v_scores s JOIN flow_runs f ON f.flow_run_id = s.flow_run_id
    WHERE f.status = 'completed' AND s.name IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY s.flow_run_id, s.task, s.metric
                               ORDER BY s.value DESC, s.name) = 1""",
    """CREATE OR REPLACE VIEW v_runs AS
    SELECT r.run_id, r.stage, r.status, f.flow, r.flow_run_id, r.started_at, r.finished_at,
           r.seconds, r.code_version, r.cache_key, r.error, r.host, r.worker, r.device,
           (SELECT string_agg(coalesce(a.name, a.artifact_id), ', ' ORDER BY a.name)
              FROM artifacts a
             WHERE list_contains(from_json(r.outputs, '["VARCHAR"]'), a.artifact_id)) AS output_names,
           r.params, r.inputs, r.outputs
    FROM runs r
    LEFT JOIN flow_runs f ON f.flow_run_id = r.flow_run_id""",
)

# MIGRATIONS[n]: statements that bring a version n-1 database to version n.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: runs.status admits 'reused'. DuckDB cannot alter a CHECK constraint, so the table
    # is rebuilt (views bind by name when queried, and are recreated afterwards anyway).
    2: (
        "ALTER TABLE runs RENAME TO runs_v1",
        RUNS_TABLE_V2,
        "INSERT INTO runs SELECT * FROM runs_v1",
        "DROP TABLE runs_v1",
    ),
    # 3: cluster_thresholds (created by the TABLES pass that follows every migration)
    3: (),
    # 4: where each stage ran
    4: ("ALTER TABLE runs ADD COLUMN worker VARCHAR", "ALTER TABLE runs ADD COLUMN device VARCHAR"),
    # 5: what glue plan compares (key parts, labels); the split of each score; proxy_scores
    # and finals (created by the TABLES pass)
    5: (
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS key_parts JSON",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS label VARCHAR",
        "ALTER TABLE scores ADD COLUMN IF NOT EXISTS split VARCHAR",
    ),
    # 6: how each similarity was computed (sketch or exact; NULL: exact, before sketches)
    6: ("ALTER TABLE similarities ADD COLUMN IF NOT EXISTS via VARCHAR",),
    # 7: model_sources and discoveries (created by the TABLES pass)
    7: (),
}
