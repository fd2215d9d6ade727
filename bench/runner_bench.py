"""Threads vs a local two-worker Dask cluster: the demo recipe's first run, end to end.

    .venv/bin/python bench/runner_bench.py [--workers 2] [--models 16] [--gpus 1,2,4,8]

Each runner gets a fresh store and lineage database (a first run: everything computes) and
runs ``glue run`` on the demo zoo's config in a child process. Reported: wall time of each
run and their ratio; from the Dask run's ``runs`` table, the time of one zoo model's
evaluation (median) and how many distinct workers evaluated; and a projection of an
evaluation of ``--models`` models on N GPUs, one evaluation per GPU at a time
(``ceil(models / N) x`` the measured per-model time, which was measured on CPU cores: a
GPU divides it by its own speed-up). On a 2-core machine a two-worker cluster cannot beat threads by much:
the stages are CPU-bound and each worker process imports torch and lm-eval once.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_glue.env import configure_environment, glue_home  # noqa: E402

HOME = configure_environment() / "bench" / "runner"


def run(kind: str, workers: int) -> tuple[float, Path]:
    src = glue_home() / "zoo" / "glue.yaml"
    cfg = yaml.safe_load(src.read_text())
    cfg["zoo"] = [{**m, "path": str((src.parent / m["path"]).resolve())} for m in cfg["zoo"]]
    out = HOME / kind
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg |= {"store": str(out / "store"), "lineage_db": str(out / "lineage.duckdb")}
    if kind == "dask":
        cfg["runner"] = {"kind": "dask", "n_workers": workers, "threads_per_worker": 1}
    path = out / "glue.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("glue")), "run", str(path)],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{kind} run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds, out / "lineage.duckdb"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--gpus", default="1,2,4,8")
    args = ap.parse_args()
    from storage import LineageDB

    threads_s, _ = run("threads", args.workers)
    print(f"threads: {threads_s:.1f} s", flush=True)
    dask_s, db_path = run("dask", args.workers)
    print(
        f"dask ({args.workers} workers): {dask_s:.1f} s; threads / dask = {threads_s / dask_s:.2f}"
    )
    db = LineageDB(str(db_path), read_only=True)
    rows = db.zoo_evaluation_runs().rows()
    per_model = statistics.median(s for s, _ in rows)
    print(
        f"zoo model evaluation: median {per_model:.1f} s over {len(rows)} models, "
        f"on {len({w for _, w in rows})} distinct workers"
    )
    for n in (int(g) for g in args.gpus.split(",")):
        print(
            f"projected evaluation of {args.models} models on {n} GPU(s), one per GPU at a "
            f"time: {math.ceil(args.models / n) * per_model:.0f} s (x the GPU's speed-up over "
            "this per-model time)"
        )


if __name__ == "__main__":
    main()
