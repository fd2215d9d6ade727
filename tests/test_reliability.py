"""Faults a nightly run meets: hostile SQL, non-finite weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GLUE = str(Path(sys.executable).with_name("glue"))


def _glue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GLUE, *args], capture_output=True, text=True, timeout=300)


def test_glue_sql_reads_the_lineage_database_only(tmp_path):
    from storage import LineageDB

    db = tmp_path / "lineage.duckdb"
    LineageDB(db).start_flow_run("f1", flow="model-glue-recipe")
    secret = tmp_path / "secret.csv"
    secret.write_text("user,password\nroot,hunter2\n")
    ok = _glue("sql", "SELECT flow_run_id FROM flow_runs", "--db", str(db))
    assert ok.returncode == 0 and "f1" in ok.stdout
    for query in (f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM glob('{tmp_path}/*')"):
        refused = _glue("sql", query, "--db", str(db))
        assert refused.returncode == 2, refused.stdout
        assert "file system operations are disabled" in " ".join(refused.stderr.split())
        assert "hunter2" not in refused.stdout and "secret.csv" not in refused.stdout
    allowed = _glue("sql", f"SELECT * FROM read_csv('{secret}')", "--db", str(db), "--allow-files")
    assert allowed.returncode == 0 and "hunter2" in allowed.stdout
    refused = _glue("sql", "CREATE TABLE x (a INT)", "--db", str(db))
    assert refused.returncode == 2


def _poison(src: Path, dst: Path) -> str:
    """A copy of ``src`` with one NaN and one Inf in one weight; returns that tensor's name."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    sd[name][0, 0] = float("nan")
    sd[name][3, 2] = float("inf")
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return name


def test_non_finite_weights_are_found_by_the_fingerprint(demo_zoo, tmp_path):
    from model_glue.fingerprint import fingerprint_checkpoint

    clean = fingerprint_checkpoint(str(demo_zoo / "models" / "add-a"))
    assert clean.nonfinite == ()
    name = _poison(demo_zoo / "models" / "add-a", tmp_path / "bad")
    fp = fingerprint_checkpoint(str(tmp_path / "bad"))
    assert fp.nonfinite == (name,)


@pytest.mark.slow
def test_a_model_with_nan_weights_is_left_out_with_one_line(demo_zoo, prefect_harness, tmp_path):
    import yaml

    from flows.glue_recipe import run_config

    models = demo_zoo / "models"
    tensor = _poison(models / "add-a2", tmp_path / "poisoned")
    zoo = [
        {"name": "base-a", "path": str(models / "base-a")},
        {"name": "add-a", "path": str(models / "add-a"), "base": "base-a"},
        {"name": "poisoned", "path": str(tmp_path / "poisoned"), "base": "base-a"},
    ]
    cfg = {
        "store": str(tmp_path / "store"),
        "lineage_db": str(tmp_path / "lineage.duckdb"),
        "zoo": zoo,
        "evaluation": {"tasks": ["demo_add"], "limit": 5},
    }
    path = tmp_path / "glue.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = run_config(path)
    assert list(summary["excluded"]) == ["poisoned"]
    why = summary["excluded"]["poisoned"]
    assert tensor in why and "NaN or Inf" in why and "\n" not in why
    assert summary["clusters"] == [["add-a", "base-a"]]  # clustering never saw the NaN
    # opted in, it is kept; its NaN similarities never link it to anything
    cfg["allow_nonfinite"] = True
    path.write_text(yaml.safe_dump(cfg))
    kept = run_config(path)
    assert kept["excluded"] == {} and "poisoned" in kept["models"]
    assert ["poisoned"] in kept["clusters"]
