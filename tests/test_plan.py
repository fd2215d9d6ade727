"""glue plan (each kind of change), the stage protocol's atomic records, glue report.

One small run of three demo models (a search and a merge included) is made once; each test
then changes one thing in a copy of its store, database or zoo and asks the plan why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.factories import GLUE, write_config, zoo_entries

pytestmark = [pytest.mark.slow]


def _write_config(root: Path) -> Path:
    """base-a and two fine-tunes of it copied to ``root/zoo``; store and database beside
    the config, relative to it."""
    return write_config(
        root / "glue.yaml",
        zoo_entries(root / "zoo", {"base-a": ["add-a", "last-a"]}),
        name="plan",
        store="store",
        lineage_db="lineage.duckdb",
        similarity={"threshold": 0.5},
        # a task-vector merge on the declared base: whatever the search keeps, it merges
        merge={"method": "task_arithmetic", "params": {"lambda": 0.5}},
        filter={"strategy": "average", "proxy_limit": 2, "proxy_tasks": ["demo_add"]},
        evaluation={"tasks": ["demo_add"], "limit": 3},
    )


@pytest.fixture(scope="module")
def ran(demo_zoo, prefect_harness, tmp_path_factory) -> Path:
    """A project folder after one complete run: config, zoo copy, store and database."""
    from flows.glue_recipe import run_config

    root = tmp_path_factory.mktemp("plan") / "project"
    for name in ("base-a", "add-a", "last-a"):
        shutil.copytree(demo_zoo / "models" / name, root / "zoo" / name)
    summary = run_config(_write_config(root))
    assert summary["merged"] and not summary["failures"]
    return root


@pytest.fixture
def project(ran, tmp_path) -> Path:
    """A private copy of the ran project's store and database (the zoo is shared)."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(ran / "store", root / "store")
    shutil.copy2(ran / "lineage.duckdb", root / "lineage.duckdb")
    shutil.copy2(ran / "glue.yaml", root / "glue.yaml")
    return root


def _beside(ran: Path, tmp_path: Path, cfg: dict) -> Path:
    """Another config over the ran project's store and database (read only by a plan)."""
    root = tmp_path / "p"
    root.mkdir()
    for name in ("store", "lineage.duckdb"):
        (root / name).symlink_to(ran / name)
    (root / "glue.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _plan(root: Path) -> list[dict]:
    from flows.plan import plan
    from model_glue.config import load_config

    cfg = load_config(root / "glue.yaml")
    return [e.to_dict() for e in plan(cfg, cfg.store, cfg.lineage_db)]


def _by(entries: list[dict], stage: str) -> list[dict]:
    return [e for e in entries if e["stage"] == stage]


def test_plan_after_a_run_is_all_fresh_and_names_every_stage(ran):
    entries = _plan(ran)
    assert {e["status"] for e in entries} == {"fresh"}, [
        e for e in entries if e["status"] != "fresh"
    ]
    assert {e["stage"] for e in entries} == {
        "fingerprint", "evaluate", "similarity", "cluster", "filter", "merge", "final"
    }  # fmt: skip
    assert all(e["reason"] == "reused" and e["key"] for e in entries)


def test_glue_plan_json_from_the_command_line(ran):
    out = subprocess.run(
        [GLUE, "plan", str(ran / "glue.yaml"), "--json"],
        capture_output=True, text=True, cwd="/", timeout=300, env=os.environ.copy(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    entries = json.loads(out.stdout)
    assert entries and all({"stage", "label", "status", "reason"} <= set(e) for e in entries)
    assert {e["status"] for e in entries} == {"fresh"}


def test_changed_weights_make_one_fingerprint_stale_and_its_dependents_wait(ran, tmp_path):
    from safetensors.torch import load_file, save_file

    f = ran / "zoo" / "last-a" / "model.safetensors"
    backup = tmp_path / "backup.safetensors"
    shutil.copy2(f, backup)
    try:
        sd = load_file(f)
        name = "model.layers.0.mlp.up_proj.weight"
        sd[name] = sd[name] * 1.01
        save_file(sd, f, metadata={"format": "pt"})
        entries = _plan(ran)
    finally:
        shutil.copy2(backup, f)
    fps = {e["label"]: e for e in _by(entries, "fingerprint")}
    assert fps["last-a"]["status"] == "stale"
    assert fps["last-a"]["reason"] == "changed weights (files changed on disk)"
    assert fps["base-a"]["status"] == fps["add-a"]["status"] == "fresh"
    evals = {e["label"]: e for e in _by(entries, "evaluate")}
    assert evals["last-a"]["reason"] == "waits on fingerprint of last-a"
    assert evals["add-a"]["status"] == "fresh"  # untouched models keep their scores
    sims = _by(entries, "similarity")  # the group's, and its base family's task vectors
    assert len(sims) == 2
    assert all(e["status"] == "stale" and "fingerprint of last-a" in e["reason"] for e in sims)
    later = _by(entries, "merge") + _by(entries, "cluster")
    assert len(later) == 2 and all(e["status"] == "stale" for e in later), later


def test_a_new_model_is_named_as_new(ran, demo_zoo, tmp_path):
    cfg = yaml.safe_load((ran / "glue.yaml").read_text())
    cfg["zoo"].append({"name": "next-a", "path": str(demo_zoo / "models" / "next-a")})
    entries = _plan(_beside(ran, tmp_path, cfg))
    (new,) = [e for e in _by(entries, "fingerprint") if e["label"] == "next-a"]
    assert (new["status"], new["reason"]) == ("stale", "new model")


def test_a_changed_parameter_is_named_with_its_values(ran, tmp_path):
    cfg = yaml.safe_load((ran / "glue.yaml").read_text())
    cfg["evaluation"]["limit"] = 4
    entries = _plan(_beside(ran, tmp_path, cfg))
    evals = [e for e in _by(entries, "evaluate") if not e["label"].endswith("(proxy)")]
    assert evals and all(e["status"] == "stale" for e in evals)
    assert "changed parameter limit: 3 -> 4" in evals[0]["reason"]
    proxies = [e for e in _by(entries, "evaluate") if e["label"].endswith("(proxy)")]
    assert proxies and all(e["status"] == "fresh" for e in proxies)  # proxy_limit unchanged
    searches = _by(entries, "filter") + _by(entries, "merge")
    assert len(searches) == 2 and all(e["status"] == "fresh" for e in searches), searches


def _with_version(component, name: str, version: str):
    """``component`` with the component ``name`` it uses (or is) at ``version``."""
    if component.name == name:
        return replace(component, version=version)
    return replace(component, uses=tuple(_with_version(c, name, version) for c in component.uses))


def test_a_new_engine_version_makes_the_search_stale(ran, monkeypatch):
    from tasks.stage import Stage, compose
    from tasks.versions import ENGINE

    old = ENGINE.version
    # every stage's code version as if the merge engine's were "merge-engine-test"
    monkeypatch.setattr(
        Stage,
        "code_version",
        property(
            lambda stage: compose(_with_version(stage.uses, ENGINE.name, "merge-engine-test"))
        ),
    )
    entries = _plan(ran)
    (search,) = _by(entries, "filter")
    assert search["status"] == "stale"
    assert f"code version: merge-engine {old} -> merge-engine-test" in search["reason"]
    (merge,) = _by(entries, "merge")  # which members it merges is the search's to say
    assert (merge["status"], merge["reason"]) == ("stale", "waits on filter of cluster base-a")
    zoo_evals = [e for e in _by(entries, "evaluate") if "merge" not in e["label"]]
    assert len(zoo_evals) == 2 * 3 and all(e["status"] == "fresh" for e in zoo_evals), zoo_evals


def test_missing_and_corrupt_artifacts(project):
    from storage import ArtifactStore

    entries = _plan(project)
    evals = {e["label"]: e for e in _by(entries, "evaluate")}
    store = ArtifactStore(str(project / "store"))
    gone, bad = evals["add-a"]["key"], evals["base-a"]["key"]
    shutil.rmtree(store.local_path("record", gone))
    data = store.local_path("record", bad) / "data.json"
    data.write_text(data.read_text().replace('"limit"', '"limjt"'))
    evals = {e["label"]: e for e in _by(_plan(project), "evaluate")}
    assert evals["add-a"]["status"] == "stale"
    assert evals["add-a"]["reason"] == f"missing artifact record/{gone[:12]}"
    assert evals["base-a"]["status"] == "stale"
    assert evals["base-a"]["reason"].startswith("corrupt artifact: ")
    assert "data.json" in evals["base-a"]["reason"]
    assert evals["last-a"]["status"] == "fresh"


def test_a_crash_between_an_artifact_and_its_details_is_recorded_again(project, monkeypatch):
    """A stage's run row, artifact row and detail rows are one transaction: a crash while
    writing the details leaves none of them, and a rerun records them all; detail rows
    lost while their artifact row stayed (as older versions could) come back too."""
    from flows.glue_recipe import run_config
    from storage import LineageDB

    db_path = str(project / "lineage.duckdb")

    def count(sql: str) -> int:
        return LineageDB(db_path, read_only=True).query(sql).item()

    with LineageDB(db_path)._writer() as con:  # details lost, artifact rows kept
        con.execute("DELETE FROM similarities")
    run_config(project / "glue.yaml")
    assert count("SELECT count(*) FROM similarities") > 0

    n_artifacts = count("SELECT count(*) FROM artifacts WHERE kind = 'similarity'")
    with LineageDB(db_path)._writer() as con:  # both lost
        con.execute("DELETE FROM similarities")
        con.execute("DELETE FROM artifacts WHERE kind = 'similarity'")
    real = LineageDB.insert_details

    def crash(self, table, rows, run_id=None, **constants):
        if table == "similarities":
            raise RuntimeError("killed between the artifact row and its details")
        return real(self, table, rows, run_id, **constants)

    monkeypatch.setattr(LineageDB, "insert_details", crash)
    with pytest.raises(RuntimeError, match="killed between"):
        run_config(project / "glue.yaml")
    assert count("SELECT count(*) FROM artifacts WHERE kind = 'similarity'") == 0
    monkeypatch.setattr(LineageDB, "insert_details", real)
    run_config(project / "glue.yaml")
    assert count("SELECT count(*) FROM artifacts WHERE kind = 'similarity'") == n_artifacts
    n = count("SELECT count(*) FROM similarities")
    assert n > 0
    run_config(project / "glue.yaml")  # recording again adds nothing: detail rows are keyed
    assert count("SELECT count(*) FROM similarities") == n


def test_the_report_opens_in_chromium_with_every_image(ran, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("GLUE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (GLUE_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    out = tmp_path / "report.html"
    done = subprocess.run(
        [GLUE, "report", "--db", str(ran / "lineage.duckdb"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    page = out.read_text()
    for section in ("Leaderboard", "Similarity and clusters", "Searches", "What changed"):
        assert section in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch: offline
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    import re

    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert loaded, dom.stderr[-2000:]
    ok, total = map(int, loaded.groups())
    assert total >= 3 and ok == total  # leaderboard, heatmap, search trajectory
