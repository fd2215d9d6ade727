"""``glue plan``: what a run of a config would reuse and what it would compute, and why.

The planner walks the same recipe as the flow (``flows.glue_recipe._recipe``) in place of
the recorder: each stage call is keyed exactly as a run keys it, and looked up in the
store without running anything (no model is loaded; fingerprints come from directory stat
signatures, as in a run). A call is

- ``fresh`` when its record (and model directory, for merges and mixtures) is complete in
  the store: a run reuses it;
- ``stale`` otherwise, with the reason, found by comparing the call with the latest
  recorded run of the same stage and label: a new model, changed weights, a changed
  parameter, input or task file, a code version, or a missing or corrupt artifact. A call
  whose inputs are themselves stale "waits on" them; a stage whose calls cannot be known
  before an earlier one runs (clusters depend on similarities) is listed as waiting.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flows._logging import RunFailed
from flows._recorder import Failure, Outcome
from model_glue.config import RunConfig
from storage import ArtifactCorruptError, ArtifactNotFoundError, ArtifactStore, LineageDB
from storage.queries import PreviousCall
from tasks.stage import RECORD_KIND, Call, parse_versions

PENDING = "pending:"
_HEX = re.compile(r"^[0-9a-f]{32,64}$")
NEW_REVISION = "new revision on the hub"
LATER = ("cluster", "filter", "merge", "evaluate", "select", "mixture", "final")


@dataclass
class PlanEntry:
    stage: str
    label: str
    status: str  # fresh | stale
    reason: str
    key: str | None = None
    artifact: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Planner:
    """Stands in for the recorder: answers each stage call from the store, records nothing."""

    def __init__(self, store_url: str, db_path: str) -> None:
        self.store = ArtifactStore(store_url)
        self.db = LineageDB(db_path, read_only=True) if Path(db_path).exists() else None
        self.entries: list[PlanEntry] = []
        self.failures: list[Failure] = []
        self.pending: dict[str, str] = {}  # placeholder id -> what it waits on
        self.unknown_fingerprints: list[str] = []
        self.names = self._names()
        self.flow_run_id = None

    # the recorder's interface, as the steps use it
    def say(self, line: str, style: str | None = None) -> None:
        pass

    def section(self, title: str) -> None:
        pass

    def waits(self, stage: str, label: str, on: str) -> None:
        self.entries.append(PlanEntry(stage, label, "stale", f"waits on {on}"))

    def run(self, c: Call) -> Outcome:
        return self.run_many([c])[0]

    def run_many(self, calls: list[Call]) -> list[Outcome]:
        return [self._plan(c) for c in calls]

    # planning
    def _plan(self, c: Call) -> Outcome:
        stage = c.stage.name
        waits = sorted({self.pending[i] for i in _strings(c.params) if i in self.pending})
        if stage == "similarity" and self.unknown_fingerprints:
            # a model not yet fingerprinted may join any group: every group waits on it
            waits += [f"fingerprint of {n}" for n in self.unknown_fingerprints]
        if waits:
            return self._stale(c, "waits on " + ", ".join(dict.fromkeys(waits)))
        if c.key is None:
            return self._stale(c, "its inputs cannot be read (the run reports why)")
        record = c.stage.find(self.store, c.key)
        if record is None:
            if (error := self._failed_before(c)) is not None:  # same inputs: same failure
                entry = PlanEntry(stage, c.label, "stale", f"fails again: {error}", c.key)
                self.entries.append(entry)
                return Outcome(c.label, "stale", 0.0, None, error)
            return self._stale(c, self._why(c))
        self.entries.append(PlanEntry(stage, c.label, "fresh", "reused", c.key, self._uri(c)))
        return Outcome(c.label, "fresh", 0.0, record)

    def _stale(self, c: Call, reason: str) -> Outcome:
        stage = c.stage.name
        self.entries.append(PlanEntry(stage, c.label, "stale", reason, c.key, self._uri(c)))
        record = None
        if stage == "fingerprint":  # later calls wait on this model's fingerprint
            name = c.params["name"]
            self.unknown_fingerprints.append(name)
            record = {
                "uri": c.params["uri"],
                "fingerprint": PENDING + name,
                # its group until fingerprinted: the architecture it had, if it was seen
                "arch_signature": self._last_arch(name) or PENDING + name,
            }
            self.pending[record["fingerprint"]] = f"fingerprint of {name}"
        elif c.key is not None and c.stage.pending is not None:  # stands for its output
            kind = c.stage.outputs[0] if c.stage.outputs else RECORD_KIND
            record = {
                "key": c.key,
                "artifact_id": c.key,
                "path": str(self.store.published_path(kind, c.key)),
                "fingerprint": PENDING + c.key,
                **c.stage.pending(c),
            }
            self.pending[record["fingerprint"]] = self.pending[c.key] = f"{stage} {c.label}"
        return Outcome(c.label, "stale", 0.0, record)

    def _uri(self, c: Call) -> str | None:
        if c.key is None:
            return None
        kind = c.stage.outputs[0] if c.stage.outputs else RECORD_KIND
        return self.store.uri(kind, c.key)

    def _why(self, c: Call) -> str:
        stage = c.stage.name
        prev = self._previous(c)
        if prev is None:
            return "new model" if stage == "fingerprint" else "new: no earlier run of this call"
        old_key, old_version, old_parts = prev
        if old_key == c.key:
            return self._damage(c)
        reasons = []
        old_v, new_v = parse_versions(old_version), parse_versions(c.stage.code_version)
        changed = [
            f"{k or 'stage'} {old_v.get(k, '-')} -> {new_v.get(k, '-')}"
            for k in sorted(set(old_v) | set(new_v))
            if old_v.get(k) != new_v.get(k)
        ]
        if changed:
            reasons.append("code version: " + ", ".join(changed))
        if old_parts is not None:
            reasons += _diff(json.loads(old_parts), c.identity["in"], "", self.names)
        commit = (c.params.get("source") or {}).get("commit")
        if commit:  # a hub model's files changed: say which commit brought them
            reasons = [
                f"new revision {commit[:7]} on the hub" if r == NEW_REVISION else r for r in reasons
            ]
        return "; ".join(reasons) or "changed inputs"

    def _damage(self, c: Call) -> str:
        """Why an artifact under an unchanged key is not usable: missing or corrupt."""
        for kind in (RECORD_KIND, *c.stage.outputs):
            try:
                self.store.verify(kind, c.key, full=kind == RECORD_KIND)
            except ArtifactNotFoundError:
                return f"missing artifact {kind}/{c.key[:12]}"
            except ArtifactCorruptError as e:
                return f"corrupt artifact: {' '.join(str(e).split())}"
        return "artifact incomplete"

    def _previous(self, c: Call) -> PreviousCall | None:
        return None if self.db is None else self.db.previous_call(c.stage.name, c.label)

    def _failed_before(self, c: Call) -> str | None:
        """The error of the latest run of this call if it failed with the same key."""
        if self.db is None or c.key is None:
            return None
        last = self.db.last_run_of(c.stage.name, c.label)
        if last and last["status"] == "failed" and last["cache_key"] == c.key:
            return last["error"] or "failed"
        return None

    def _last_arch(self, name: str) -> str | None:
        return None if self.db is None else self.db.arch_signature_of(name)

    def _names(self) -> dict[str, str]:
        """Artifact ids and fingerprints -> names, to say which input changed."""
        return {} if self.db is None else self.db.artifact_names()


def plan(cfg: RunConfig, store_url: str, db_path: str) -> list[PlanEntry]:
    """Every stage call of a run of ``cfg``, fresh or stale with the reason."""
    from flows.glue_recipe import _recipe

    planner = Planner(store_url, db_path)
    try:
        _recipe(cfg, planner)
        _unplanned_failures(planner)
    except RunFailed:
        _unplanned_failures(planner)
        blocker = next((e for e in reversed(planner.entries) if e.status == "stale"), None)
        on = "the zoo" if blocker is None else f"{blocker.stage} {blocker.label}"
        seen = {e.stage for e in planner.entries}
        for stage in LATER:
            if stage not in seen or stage == "evaluate":
                label = "merged models, proxy evaluations" if stage == "evaluate" else "(all)"
                planner.entries.append(PlanEntry(stage, label, "stale", f"waits on {on}"))
    return planner.entries


def _unplanned_failures(planner: Planner) -> None:
    """What failed before any stage call could stand for it (a hub repo that cannot be
    resolved, a discovery that cannot be asked): one row each, so that no model of the
    config disappears from the plan without a word."""
    planned = {(e.stage, e.label) for e in planner.entries}
    for f in planner.failures:
        if (f.stage, f.label) not in planned:
            planner.entries.append(PlanEntry(f.stage, f.label, "stale", f"fails: {f.error}"))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _diff(old: Any, new: Any, path: str, names: dict[str, str]) -> list[str]:
    """Readable differences between two key-part trees."""
    if path == "uri" and isinstance(new, dict) and "hub" in new and old != new:
        if isinstance(old, dict) and "hub" in old and old["hub"]["repo"] == new["hub"]["repo"]:
            return [NEW_REVISION]
        return [f"now from the hub: {new['hub']['repo']}"]
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}" if path else str(k), names)
        return out
    if old == new:
        return []
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "stat":
        return ["changed weights (files changed on disk)"]
    if leaf == "uri":
        return [f"moved: {old} -> {new}"]
    if "task_files" in path or leaf == "include_paths":
        return ["changed task files"]
    if leaf == "repos" and isinstance(old, list) and isinstance(new, list):  # discovery
        added = [f"+{r}" for r in new if r not in old]
        gone = [f"-{r}" for r in old if r not in new]
        return [f"the hub lists {' '.join(added + gone) or 'them in another order'}"]
    shown_old, shown_new = _show(old, names), _show(new, names)
    if _is_input(old) or _is_input(new):
        if isinstance(old, list) and isinstance(new, list):
            o = {json.dumps(x, sort_keys=True): x for x in old}
            n = {json.dumps(x, sort_keys=True): x for x in new}
            added = [_show(n[k], names) for k in n.keys() - o.keys()]
            removed = [_show(o[k], names) for k in o.keys() - n.keys()]
            parts = [f"+{a}" for a in sorted(added)] + [f"-{r}" for r in sorted(removed)]
            return [f"changed input {path}: {' '.join(parts)}"]
        return [f"changed input {path}: {shown_old} -> {shown_new}"]
    return [f"changed parameter {path}: {shown_old} -> {shown_new}"]


def _is_input(value: Any) -> bool:
    return any(_HEX.match(s) or s.startswith(PENDING) for s in _strings(value))


def _show(value: Any, names: dict[str, str]) -> str:
    """A value with content ids shortened and named where known."""
    if isinstance(value, str):
        if value in names:
            return f"{names[value]}@{value[:8]}"
        return value[:12] if _HEX.match(value) else value
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v, names) for v in value) + "]"
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else repr(value)
