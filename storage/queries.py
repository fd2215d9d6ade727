"""Named queries: the questions the CLI, ``glue report`` and ``glue plan`` ask the lineage
database, so that no code outside ``storage/`` writes SQL. (``Database.query`` runs a
user's own read statement: ``glue sql``.) Leaderboards and the headline: ``storage.scores``.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import polars as pl

from storage.db import Database, LineageError


class PreviousCall(NamedTuple):
    """What the latest successful run of a stage call was keyed on."""

    cache_key: str
    code_version: str | None
    key_parts: str | None  # JSON


class Queries(Database):
    # ---- the artifact graph ---------------------------------------------------------------
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

    def ancestors(self, ref: str) -> pl.DataFrame:
        """Every artifact that ``ref`` was derived from, transitively (zoo models included)."""
        return self._walk(ref, up=True)

    def descendants(self, ref: str) -> pl.DataFrame:
        """Every artifact derived from ``ref``, transitively."""
        return self._walk(ref, up=False)

    def _walk(self, ref: str, *, up: bool) -> pl.DataFrame:
        # No depth column inside the recursion: UNION deduplicates ids, which keeps the walk
        # linear in the graph size (a depth column makes every path distinct).
        start, nxt = ("child_id", "parent_id") if up else ("parent_id", "child_id")
        with self._reader():
            artifact_id = self.resolve(ref)
            return self._select(
                f"""WITH RECURSIVE walk(id) AS (
                        SELECT {nxt} FROM edges WHERE {start} = ?
                        UNION
                        SELECT e.{nxt} FROM edges e JOIN walk w ON e.{start} = w.id)
                    SELECT w.id AS artifact_id, a.kind, a.name, a.uri, a.stage, a.created_at,
                           a.run_id
                    FROM walk w LEFT JOIN artifacts a ON a.artifact_id = w.id
                    WHERE w.id <> ?
                    ORDER BY a.created_at, w.id""",
                [artifact_id, artifact_id],
            )

    def parents_of(self, artifact_id: str) -> pl.DataFrame:
        """The direct parents of an artifact: ``parent_name``, ``role`` (by role, then name)."""
        return self._select(
            "SELECT parent_name, role FROM v_lineage WHERE child_id = ? ORDER BY role, parent_name",
            [artifact_id],
        )

    def artifact_meta(self, artifact_id: str) -> dict[str, Any]:
        """An artifact's ``meta`` (what its stage noted about it); empty if none."""
        rows = self._select("SELECT meta FROM artifacts WHERE artifact_id = ?", [artifact_id])
        return json.loads(rows["meta"][0]) if rows.height and rows["meta"][0] else {}

    def output_meta(self, flow_run_id: str, kind: str, name: str) -> dict[str, Any]:
        """The ``meta`` of the ``kind`` artifact named ``name`` that a stage call of the flow
        run output (computed, reused or cached); empty if none."""
        rows = self._select(
            "SELECT a.meta FROM artifacts a JOIN runs r ON list_contains("
            "from_json(r.outputs, '[\"VARCHAR\"]'), a.artifact_id) "
            "WHERE a.kind = ? AND a.name = ? AND r.flow_run_id = ? LIMIT 1",
            [kind, name, flow_run_id],
        )
        return json.loads(rows["meta"][0]) if rows.height and rows["meta"][0] else {}

    def zoo_evaluation_runs(self) -> pl.DataFrame:
        """Every completed evaluation of a zoo model (not a merge or mixture): ``seconds``
        and the ``worker`` it ran on."""
        return self._select(
            "SELECT r.seconds, r.worker FROM runs r JOIN artifacts a ON a.run_id = r.run_id "
            "WHERE r.stage = 'evaluate' AND r.status = 'completed' AND a.kind = 'evaluation' "
            "AND a.name NOT LIKE 'eval:merge-%' AND a.name NOT LIKE 'eval:mixture-%'"
        )

    def artifact_names(self) -> dict[str, str]:
        """Artifact ids and fingerprints -> names."""
        rows = self._select("SELECT artifact_id, name FROM artifacts WHERE name IS NOT NULL")
        return dict(rows.iter_rows())

    def arch_signature_of(self, name: str) -> str | None:
        """The architecture signature the zoo model ``name`` had when last seen."""
        rows = self._select(
            "SELECT arch_signature FROM models WHERE name = ? ORDER BY last_seen DESC LIMIT 1",
            [name],
        )
        return rows["arch_signature"][0] if rows.height else None

    # ---- flow runs and stage calls --------------------------------------------------------
    def latest_flow_run(self, flow_run_id: str | None = None) -> dict[str, Any]:
        """The latest finished flow run (or the one named) with all its columns."""
        where = "status <> 'running'" if flow_run_id is None else "flow_run_id = ?"
        rows = self._select(
            f"SELECT * FROM flow_runs WHERE {where} ORDER BY started_at DESC LIMIT 1",
            [] if flow_run_id is None else [flow_run_id],
        )
        if rows.height == 0:
            raise LineageError(
                "no finished flow run recorded yet"
                if flow_run_id is None
                else f"no flow run {flow_run_id!r}"
            )
        return rows.row(0, named=True)

    def previous_flow_run(self, flow_run: dict[str, Any]) -> str | None:
        """The finished run of the same flow that started last before ``flow_run``."""
        rows = self._select(
            "SELECT flow_run_id FROM flow_runs WHERE flow = ? AND started_at < ? "
            "AND status <> 'running' ORDER BY started_at DESC LIMIT 1",
            [flow_run["flow"], flow_run["started_at"]],
        )
        return rows["flow_run_id"][0] if rows.height else None

    def stage_runs_of(self, flow_run_id: str) -> pl.DataFrame:
        """A flow run's stage calls in the order they started: ``stage``, ``label``,
        ``status``, ``cache_key``, ``error``, ``seconds``."""
        return self._select(
            "SELECT stage, label, status, cache_key, error, seconds FROM runs "
            "WHERE flow_run_id = ? ORDER BY started_at, run_id",
            [flow_run_id],
        )

    def previous_call(self, stage: str, label: str) -> PreviousCall | None:
        """What the latest run of this stage call that did not fail was keyed on."""
        rows = self._select(
            "SELECT cache_key, code_version, key_parts FROM runs WHERE stage = ? AND label = ? "
            "AND status <> 'failed' AND cache_key IS NOT NULL "
            "ORDER BY started_at DESC LIMIT 1",
            [stage, label],
        )
        return PreviousCall(*rows.row(0)) if rows.height else None

    def last_run_of(self, stage: str, label: str) -> dict[str, Any] | None:
        """The latest run of this stage call, whatever its status: ``status``,
        ``cache_key``, ``error``."""
        rows = self._select(
            "SELECT status, cache_key, error FROM runs WHERE stage = ? AND label = ? "
            "ORDER BY started_at DESC LIMIT 1",
            [stage, label],
        )
        return rows.row(0, named=True) if rows.height else None

    # ---- what the stages recorded ---------------------------------------------------------
    def clusters_of(self, clustering_id: str) -> pl.DataFrame:
        """A clustering's members: ``cluster``, ``fp`` (fingerprint), ``name``."""
        return self._select(
            "SELECT c.cluster, c.model_fingerprint AS fp, m.name FROM clusters c "
            "LEFT JOIN models m ON m.fingerprint = c.model_fingerprint "
            "WHERE c.clustering_id = ? ORDER BY c.cluster, m.name",
            [clustering_id],
        )

    def thresholds_of(self, clustering_id: str) -> pl.DataFrame:
        """A clustering's similarity threshold per architecture group, with how it was chosen."""
        return self._select(
            "SELECT arch_signature, metric, rule, threshold, gap_low, gap_high, n_pairs "
            "FROM cluster_thresholds WHERE clustering_id = ? ORDER BY arch_signature",
            [clustering_id],
        )

    def run_thresholds(self, flow_run_id: str) -> pl.DataFrame:
        """The similarity threshold of each architecture group, as the flow run's
        clustering chose it (rule, value, the gap it sits in, pairs it was chosen from)."""
        return self._select(
            "SELECT t.arch_signature, t.metric, t.rule, t.threshold, t.gap_low, t.gap_high, "
            "t.n_pairs FROM cluster_thresholds t WHERE t.clustering_id IN ("
            "  SELECT json_extract_string(r.outputs, '$[0]') FROM runs r"
            "  WHERE r.flow_run_id = ? AND r.stage = 'cluster' AND r.status != 'failed')"
            " ORDER BY t.arch_signature",
            [flow_run_id],
        )

    def similarities_among(self, fingerprints: list[str], metric: str) -> pl.DataFrame:
        """Pairwise similarities (``model_a``, ``model_b``, ``value``) within a set of
        models; where a pair was refined, its exact value rather than its estimate."""
        return self._select(
            "SELECT model_a, model_b, value FROM similarities WHERE metric = ? "
            "AND list_contains(?, model_a) AND list_contains(?, model_b) "
            "QUALIFY row_number() OVER (PARTITION BY model_a, model_b, tensor_set "
            "ORDER BY coalesce(via, 'exact') = 'exact' DESC) = 1",
            [metric, fingerprints, fingerprints],
        )

    def trials_of(self, search_id: str) -> pl.DataFrame:
        """A search's trials in order (a merge search's, or the mixture's expert selection)."""
        return self._select(
            "SELECT trial, strategy, coefficients, proxy_score, accepted, reason FROM trials "
            "WHERE search_id = ? ORDER BY trial",
            [search_id],
        )
