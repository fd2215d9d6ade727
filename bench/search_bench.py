"""Selective-merging benchmark on the demo zoo: strategy x method, plus the cost of one trial.

The project's counterpart of the paper's merging benchmark (Model-GLUE, Table 2). For the
base-a family of the demo zoo (base-a, add-a, add-a2, next-a, last-a, noisy-a) each row runs
one search with proxy scores from lm-eval on the demo tasks limited to ``--limit`` documents,
then scores the chosen merge on the full tasks (200 documents each). Each row runs on its own:
greedy rows include the proxy evaluations of the single models they need.

Kept affordable on a shared 2-core machine: proxy limit 30 and a CMA-ES budget of 40
evaluations by default (the paper uses about 100 items per task and about 200 evaluations).

    .venv/bin/python bench/search_bench.py [--limit 30] [--budget 40] [--out FILE]

Prints a markdown table; ``--out`` also writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from model_glue.env import configure_environment, glue_home

configure_environment()

from model_glue.evaluate import evaluate  # noqa: E402
from model_glue.search import (  # noqa: E402
    SearchResult,
    TrialSpec,
    evolutionary_search,
    greedy_selective_merge,
)
from model_glue.search.proxy import ProxyScorer  # noqa: E402

FAMILY = ["base-a", "add-a", "add-a2", "next-a", "last-a", "noisy-a"]
BASE = "base-a"
TASKS = ["demo_add", "demo_next", "demo_last"]
FIXED = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}}


def full_score(scorer: ProxyScorer, spec: TrialSpec) -> tuple[float, dict[str, float]]:
    """Mean exact match of the merge on the full demo tasks (merged in memory by the engine)."""
    scorer.load_into_model(scorer.merge(spec))
    scores = evaluate(scorer.model, TASKS, tokenizer=scorer.proxy.tokenizer)
    per_task = {s.task: s.value for s in scores if s.metric == "exact_match"}
    return sum(per_task.values()) / len(per_task), per_task


def run_row(name: str, method: str, search, scorer: ProxyScorer) -> dict:
    start = time.perf_counter()
    result: SearchResult = search()
    seconds = time.perf_counter() - start
    mean, per_task = full_score(scorer, result.spec)
    row = {
        "strategy": name,
        "method": method,
        "full_mean": mean,
        "full_per_task": per_task,
        "proxy_best": result.best_score,
        "evaluations": result.evaluations,
        "seconds": seconds,
        "accepted": result.accepted,
        "rejected": sorted(result.rejected),
        "coefficients": result.spec.coefficients(),
    }
    print(
        f"  {name:24s} {method:16s} full {mean:.3f} proxy {result.best_score:.3f} "
        f"evals {result.evaluations:3d} {seconds:6.1f}s rejected {row['rejected']}",
        file=sys.stderr,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=glue_home() / "zoo" / "models")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    paths = {n: args.zoo / n for n in FAMILY}
    missing = [str(p) for p in paths.values() if not p.is_dir()]
    if missing:
        sys.exit(f"demo zoo not found: {missing} (build it with the demo-zoo flow first)")
    load_start = time.perf_counter()
    scorer = ProxyScorer.from_checkpoints(
        paths, TASKS, limit=args.limit, base=paths[BASE], method_params=FIXED
    )
    load_seconds = time.perf_counter() - load_start

    rows = []
    singles = {}
    for n in FAMILY:
        singles[n] = full_score(scorer, TrialSpec({n: 1.0}))[0]
    best_single = max(singles, key=singles.get)
    uniform = TrialSpec({n: 1.0 for n in FAMILY})
    rows.append(
        {
            "strategy": "best single model",
            "method": "-",
            "full_mean": singles[best_single],
            "evaluations": 0,
            "seconds": 0.0,
            "accepted": [best_single],
            "rejected": [],
        }
    )
    rows.append(
        {
            "strategy": "no filtering (all six)",
            "method": "linear",
            "full_mean": full_score(scorer, uniform)[0],
            "evaluations": 0,
            "seconds": 0.0,
            "accepted": FAMILY,
            "rejected": [],
        }
    )

    for strategy in ("average", "coefficient", "similarity"):
        rows.append(
            run_row(
                f"greedy-{strategy}",
                "linear",
                lambda s=strategy: greedy_selective_merge(
                    FAMILY, None, scorer, strategy=s, similarity=scorer.similarity
                ),
                scorer,
            )
        )
    for method, density in (("linear", False), ("task_arithmetic", False), ("ties", True)):
        rows.append(
            run_row(
                "evolutionary",
                method + (" + density" if density else ""),
                lambda m=method, d=density: evolutionary_search(
                    FAMILY, scorer, method=m, search_density=d, budget=args.budget
                ),
                scorer,
            )
        )
    rows.append(
        run_row(
            "evolutionary, 2 layer groups",
            "linear",
            lambda: evolutionary_search(FAMILY, scorer, layer_groups=2, budget=args.budget),
            scorer,
        )
    )

    merged = [c for c in scorer.costs if c.models > 1]
    cost = {
        "trials": len(merged),
        "merge_median_s": statistics.median(c.merge_seconds for c in merged),
        "eval_median_s": statistics.median(c.eval_seconds for c in merged),
        "merge_median_by_method_s": {
            m: statistics.median(c.merge_seconds for c in merged if c.method == m)
            for m in sorted({c.method for c in merged})
        },
        "load_cluster_s": load_seconds,
    }
    print_table(rows, singles, cost, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "limit": args.limit,
            "budget": args.budget,
            "singles": singles,
            "rows": rows,
            "trial_cost": cost,
        }
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(args.out)


def print_table(rows: list[dict], singles: dict, cost: dict, args) -> None:
    print(
        f"Proxy: demo_add/next/last, limit {args.limit}; CMA-ES budget {args.budget}; "
        "full score: mean exact match over 3 x 200 documents.\n"
    )
    print(
        "| strategy | method | full mean | best proxy | proxy evals | wall s | accepted | rejected |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        proxy = f"{r['proxy_best']:.3f}" if "proxy_best" in r else "-"
        print(
            f"| {r['strategy']} | {r['method']} | {r['full_mean']:.3f} | {proxy} | {r['evaluations']} | "
            f"{r['seconds']:.0f} | {', '.join(r['accepted'])} | {', '.join(r['rejected']) or '-'} |"
        )
    print("\nSingle models (full mean): " + ", ".join(f"{n} {v:.3f}" for n, v in singles.items()))
    ratio = cost["eval_median_s"] / max(cost["merge_median_s"], 1e-9)
    print(
        f"\nOne trial (median of {cost['trials']}): in-memory merge {cost['merge_median_s'] * 1000:.1f} ms, "
        f"proxy evaluation {cost['eval_median_s'] * 1000:.0f} ms (evaluation/merge = {ratio:.0f}x); "
        f"loading the cluster once: {cost['load_cluster_s']:.1f} s."
    )
    by_method = ", ".join(
        f"{m} {v * 1000:.1f} ms" for m, v in cost["merge_median_by_method_s"].items()
    )
    print(f"Median in-memory merge by method: {by_method}.")


if __name__ == "__main__":
    main()
