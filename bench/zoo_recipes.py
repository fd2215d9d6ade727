"""Demo-zoo recipes, measured before one is chosen (the table in docs/demo_zoo.md).

For each base recipe and each fine-tune recipe it trains the family-A models of the demo
zoo (two fine-tunes per skill for add and next: soup pairs; one for last; the detrimental
model) and evaluates, on the test split of the three demo tasks (``--limit`` documents
each):

- every model;
- the soups (uniform averages of the two same-skill fine-tunes), against their members;
- the uniform average and task arithmetic of one fine-tune per skill (what a family merge
  has to work with), against the best member.

Bases are cached under ``$GLUE_HOME/zoo-recipes`` (a base takes minutes, a fine-tune
seconds). Usage::

    .venv/bin/python bench/zoo_recipes.py [--bases v3,mix30] [--fine-tunes v3,replay] [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_glue.env import configure_environment  # noqa: E402
from model_glue.zoo.recipe import BaseModel, FineTune, Schedule  # noqa: E402

HOME = configure_environment() / "zoo-recipes"
TASKS = ["demo_add", "demo_next", "demo_last"]

BASES = {
    "v3": BaseModel("base-a", 1, 11, Schedule(steps=600, lr=3e-3), skill_mix=0.10),
    "mix30": BaseModel("base-a", 1, 11, Schedule(steps=600, lr=3e-3), skill_mix=0.30),
    "mix20": BaseModel("base-a", 1, 11, Schedule(steps=600, lr=3e-3), skill_mix=0.20),
    "mix15-500": BaseModel("base-a", 1, 11, Schedule(steps=500, lr=3e-3), skill_mix=0.15),
    "half20-500": BaseModel(
        "base-a", 1, 11, Schedule(steps=500, lr=3e-3), skill_mix=0.20, half_skills=True
    ),
    "v4": BaseModel(  # the zoo's base-a (bench on a copy of .glue/zoo/models/base-a)
        "base-a", 1, 11, Schedule(steps=500, lr=3e-3), skill_mix=0.20, half_skills=True
    ),
    "half30-500": BaseModel(
        "base-a", 1, 11, Schedule(steps=500, lr=3e-3), skill_mix=0.30, half_skills=True
    ),
}
FINE_TUNES = {
    "v3": {"schedule": Schedule(steps=120, lr=1e-3, seq_len=32), "replay": 0.0},
    "replay50": {"schedule": Schedule(steps=120, lr=1e-3, seq_len=32), "replay": 0.5},
    "replay50-lr5e-4": {"schedule": Schedule(steps=120, lr=5e-4, seq_len=32), "replay": 0.5},
    "replay50-lr3e-4-200": {
        "schedule": Schedule(steps=200, lr=3e-4, seq_len=32),
        "replay": 0.5,
    },
    "replay25": {"schedule": Schedule(steps=120, lr=1e-3, seq_len=32), "replay": 0.25},
    "replay25-lr5e-4": {"schedule": Schedule(steps=120, lr=5e-4, seq_len=32), "replay": 0.25},
    "replay25-lr5e-4-160": {
        "schedule": Schedule(steps=160, lr=5e-4, seq_len=32),
        "replay": 0.25,
    },
    "v4-subsets": {
        "schedule": Schedule(steps=160, lr=5e-4, seq_len=32),
        "replay": 0.25,
        "subset": True,
    },
    "lr5e-4-80": {"schedule": Schedule(steps=80, lr=5e-4, seq_len=32), "replay": 0.0},
}
MODELS = [  # name, skills, data seed, corrupt
    ("add-a", ("add",), 101, False),
    ("add-a2", ("add",), 102, False),
    ("next-a", ("next",), 103, False),
    ("next-a2", ("next",), 107, False),
    ("last-a", ("last",), 104, False),
    ("noisy-a", ("add", "next", "last"), 105, True),
]


def base_model(name: str, tokenizer):
    """The base of recipe ``name``, trained once and cached."""
    import torch
    from transformers import LlamaForCausalLM

    from model_glue.zoo.recipe import ModelShape
    from model_glue.zoo.train import pretrain_base

    path = HOME / f"base-{name}"
    if (path / "model.safetensors").exists():
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), None
    t0 = time.perf_counter()
    model, _ = pretrain_base(BASES[name], ModelShape(), tokenizer)
    seconds = time.perf_counter() - t0
    model.save_pretrained(path)
    return model, seconds


def merged(like, method: str, models, base=None, **params):
    """A copy of ``like`` holding the merge engine's in-memory merge of ``models``."""
    import copy

    from model_glue.merge import merge_in_memory

    out = copy.deepcopy(like)
    states = [m.state_dict() for m in models]
    out.load_state_dict(
        merge_in_memory(method, states, base.state_dict() if base else None, params=params)
    )
    return out


def average(models):
    return merged(models[0], "linear", models)


def task_arithmetic(base, models, lam):
    return merged(base, "task_arithmetic", models, base, **{"lambda": lam})


def scores(model, tokenizer, limit: int) -> dict[str, float]:
    from model_glue.evaluate import evaluate

    got = evaluate(model, TASKS, tokenizer=tokenizer, limit=limit or None)
    return {s.task.removeprefix("demo_"): round(s.value, 3) for s in got}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bases", default="v3")
    ap.add_argument("--fine-tunes", default="v3")
    ap.add_argument("--limit", type=int, default=100, help="documents per task; 0: all")
    ap.add_argument("--table", action="store_true", help="print the table of every row so far")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(line) for line in ROWS.read_text().splitlines()]))
        return
    import torch

    from model_glue.zoo.tokenizer import build_char_tokenizer
    from model_glue.zoo.train import fine_tune

    torch.set_num_threads(1)
    HOME.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer()
    rows: list[dict] = []
    for b in args.bases.split(","):
        base, seconds = base_model(b, tok)
        row = {"base": b, "fine_tune": "-", "model": "base-a", **scores(base, tok, args.limit)}
        print(json.dumps(row | {"seconds": seconds}), flush=True)
        rows.append(row)
        keep(row)
        for f in args.fine_tunes.split(","):
            trained, ft_seconds = {}, []
            for name, skills, seed, corrupt in MODELS:
                recipe = dict(FINE_TUNES[f])
                recipe["subset"] = seed if recipe.get("subset") else 0
                spec = FineTune(name, "base-a", skills, seed, corrupt=corrupt, **recipe)
                t0 = time.perf_counter()
                trained[name], _ = fine_tune(spec, base, tok, BASES[b])
                ft_seconds.append(time.perf_counter() - t0)
            merges = {
                "soup add-a+add-a2": average([trained["add-a"], trained["add-a2"]]),
                "soup next-a+next-a2": average([trained["next-a"], trained["next-a2"]]),
                "avg add+next+last": average([trained[n] for n in ("add-a", "next-a", "last-a")]),
                "TA 0.5 add+next+last": task_arithmetic(
                    base, [trained[n] for n in ("add-a", "next-a", "last-a")], 0.5
                ),
                "TA 1.0 add+next+last": task_arithmetic(
                    base, [trained[n] for n in ("add-a", "next-a", "last-a")], 1.0
                ),
            }
            for name, model in [*trained.items(), *merges.items()]:
                row = {"base": b, "fine_tune": f, "model": name, **scores(model, tok, args.limit)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                keep(row)
            print(f"# fine-tunes {f}: {sum(ft_seconds) / len(ft_seconds):.1f} s each", flush=True)
    print(table(rows))


ROWS = HOME / "rows.jsonl"  # every row measured, one JSON object per line


def keep(row: dict) -> None:
    with ROWS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def table(rows: list[dict]) -> str:
    """One line per (base, fine-tune recipe): the means over the three tasks (add / next /
    last in brackets where it matters) of the base, the best fine-tune, each soup against
    its members, the merges of one fine-tune per skill and the detrimental model."""

    def mean(r: dict) -> float:
        return (r["add"] + r["next"] + r["last"]) / 3

    def cell(r: dict | None) -> str:
        return (
            "-" if r is None else f"{mean(r):.2f} ({r['add']:.2f}/{r['next']:.2f}/{r['last']:.2f})"
        )

    by = {}
    for r in rows:
        by.setdefault(r["base"], {}).setdefault(r["fine_tune"], {})[r["model"]] = r
    head = (
        "| base | fine-tunes | base-a | best fine-tune | soup add (members) | soup next (members) "
        "| average add+next+last | TA 0.5 | TA 1.0 | noisy-a |"
    )
    lines = [head, "|" + "---|" * 10]
    for b, fts in by.items():
        base = fts.get("-", {}).get("base-a")
        for f, m in fts.items():
            if f == "-":
                continue
            singles = [m[n] for n in ("add-a", "add-a2", "next-a", "next-a2", "last-a") if n in m]
            best = max(singles, key=mean, default=None)

            def soup(skill: str, m=m) -> str:
                s, a, b2 = (
                    m.get(f"soup {skill}-a+{skill}-a2"),
                    m.get(f"{skill}-a"),
                    m.get(f"{skill}-a2"),
                )
                if not (s and a and b2):
                    return "-"
                return f"{s[skill]:.2f} ({a[skill]:.2f}, {b2[skill]:.2f})"

            lines.append(
                f"| {b} | {f} | {cell(base)} | {cell(best)} | {soup('add')} | {soup('next')} "
                f"| {cell(m.get('avg add+next+last'))} | {cell(m.get('TA 0.5 add+next+last'))} "
                f"| {cell(m.get('TA 1.0 add+next+last'))} | {cell(m.get('noisy-a'))} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
