"""Search memory at scale: does a cluster search hold one model, whatever the cluster's size?

    .venv/bin/python bench/scale_bench.py [--sizes 3,6] [--trials 3] [--limit 10]

Inputs: a random bf16 Llama (hidden 768, 12 layers, intermediate 2048, grouped-query
attention 12/4 heads, vocabulary 32000: about 150M parameters, ~300 MB on disk) and six
"fine-tunes" of it (base + small noise), single-file safetensors with the demo zoo's
tokenizer, written once under ``$GLUE_HOME/bench/search-scale/``. Needs the demo zoo
(``glue zoo build``) for the tokenizer and the ``demo_add`` task.

Every measurement runs in a fresh child process that reports its wall time and peak
resident memory (``VmHWM``, which counts file pages a process maps: the readers here
``readinto`` fresh tensors instead):

- ``eval``: one model evaluated on ``demo_add`` (lm-eval, ``limit`` documents);
- ``search``: ``ProxyScorer.from_checkpoints`` over N members (lazy, one resident model)
  and ``trials`` linear trials over all N with fresh weights, as CMA-ES makes them;
- ``search-resident``: the reference, the previous scorer: every member loaded as a
  float32 state dict, the merged state dict built, then copied into the model;
- ``similarity``: ``pairwise_similarity`` over the N members;
- ``engine``: the streaming engine merging the same N models (linear) to disk.

Targets (issue "Real zoos"): the search's peak at most 0.5 GB above the evaluation's, and
growing by at most 10% from 3 to 6 members; a trial's merge no slower than the engine's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge_bench import peak_resident_mb  # noqa: E402  (bench/ is the script's directory)

from model_glue.env import configure_environment, glue_home  # noqa: E402

HOME = configure_environment() / "bench" / "search-scale"
TASK = "demo_add"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_inputs(n: int, hidden: int, layers: int, intermediate: int, vocab: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = glue_home() / "zoo" / "models" / "base-a"
    if not (tok / "tokenizer.json").exists():
        raise SystemExit("scale_bench needs the demo zoo's tokenizer: run `glue zoo build`")
    shape = f"h{hidden}-l{layers}-i{intermediate}-v{vocab}"
    paths = [HOME / shape / f"m{i}" for i in range(n)]
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 192),
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    for i, out in enumerate(paths):
        if (out / "model.safetensors").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)  # the same base draws for every model
        noise = torch.Generator().manual_seed(100 + i)
        sd = {}
        for k, s in shapes.items():
            t = torch.randn(s, generator=g) * 0.02
            if k.endswith("norm.weight"):
                t += 1.0
            if i:
                t += 0.002 * torch.randn(s, generator=noise)
            sd[k] = t.to(torch.bfloat16)
        tmp = out / "model.safetensors.tmp"
        save_file(sd, str(tmp), metadata={"format": "pt"})
        tmp.rename(out / "model.safetensors")
        cfg.save_pretrained(out)
        for f in TOKENIZER_FILES:
            if (tok / f).exists():
                shutil.copy(tok / f, out / f)
        print(f"wrote {out} ({sum(t.numel() for t in sd.values()) / 1e6:.0f}M parameters)")
    return paths


def child(kind: str, paths: list[str], trials: int, limit: int, device: str = "cpu") -> dict:
    import random

    import torch

    t0 = time.perf_counter()
    out: dict = {}
    if kind == "eval":
        from model_glue.evaluate import evaluate

        evaluate(paths[0], [TASK], limit=limit, device=device)
    elif kind in ("search", "search-resident"):
        from model_glue.search import TrialSpec
        from model_glue.search.proxy import ProxyScorer, load_state_dict

        names = {f"m{i}": p for i, p in enumerate(paths)}
        scorer = ProxyScorer.from_checkpoints(names, [TASK], limit=limit, device=device)
        if kind == "search-resident":  # the previous scorer: members resident in float32
            scorer = ProxyScorer(
                {n: load_state_dict(p) for n, p in names.items()}, scorer.model, scorer.proxy
            )

            def old_way(spec):  # the merged state dict first, then a copy into the model
                scorer.load_into_model(scorer.merge(spec))

            scorer.merge_into_model = old_way
        rng = random.Random(0)
        for _ in range(trials):
            scorer(TrialSpec({n: rng.uniform(0.1, 1.0) for n in names}, "linear"))
        costs = scorer.costs
        out |= {
            "merge_s_per_trial": sum(c.merge_seconds for c in costs) / len(costs),
            "eval_s_per_trial": sum(c.eval_seconds for c in costs) / len(costs),
        }
    elif kind == "similarity":
        from model_glue.checkpoint import Checkpoint
        from model_glue.similarity import pairwise_similarity

        pairwise_similarity({f"m{i}": Checkpoint(p) for i, p in enumerate(paths)})
    elif kind == "engine":
        from model_glue.merge import MergeSpec, ModelInput, merge_to_directory

        t0 = time.perf_counter()  # the merge itself, as a trial's merge time is
        dest = HOME / "engine-out"
        shutil.rmtree(dest, ignore_errors=True)
        spec = MergeSpec(
            method="linear",
            models=[
                ModelInput(uri=p, name=f"m{i}", params={"weight": 1.0}) for i, p in enumerate(paths)
            ],
        )
        merge_to_directory(spec, str(dest))
        shutil.rmtree(dest)
    else:
        raise SystemExit(f"unknown child {kind!r}")
    if device.startswith("cuda"):
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out | {"seconds": time.perf_counter() - t0, "peak_mb": peak_resident_mb()}


def run_child(kind: str, paths: list[Path], trials: int, limit: int, device: str = "cpu") -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--trials", str(trials), "--limit", str(limit)]
        + ["--device", device]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="3,6")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kinds", default="eval,search,search-resident,similarity,engine")
    ap.add_argument("--device", default="cpu", help="evaluation device of eval and search")
    ap.add_argument("--child", metavar="KIND")
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.paths, args.trials, args.limit, args.device)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    paths = make_inputs(max(sizes), args.hidden, args.layers, args.intermediate, args.vocab)
    model_mb = (paths[0] / "model.safetensors").stat().st_size / 2**20
    kinds = args.kinds.split(",")
    results = {"model_mb": model_mb, "trials": args.trials, "limit": args.limit, "rows": {}}
    print(f"one model {model_mb:.0f} MB on disk (bf16); {args.trials} trials, limit {args.limit}")
    evaluation = (
        run_child("eval", paths[:1], args.trials, args.limit, args.device)
        if "eval" in kinds
        else None
    )
    if evaluation:
        print(
            f"eval            peak {evaluation['peak_mb']:6.0f} MB  {evaluation['seconds']:5.1f} s"
        )
    for n in sizes:
        row = {"cluster_mb": n * model_mb}
        for kind in kinds:
            if kind == "eval":
                continue
            r = row[kind] = run_child(kind, paths[:n], args.trials, args.limit, args.device)
            extra = f"  GPU peak {r['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in r else ""
            if "merge_s_per_trial" in r:
                extra += f"  trial: merge {r['merge_s_per_trial']:.2f} s, eval {r['eval_s_per_trial']:.2f} s"
            print(
                f"{kind:16s} n={n}  peak {r['peak_mb']:6.0f} MB  {r['seconds']:5.1f} s{extra}",
                flush=True,
            )
        results["rows"][n] = row
    results["eval"] = evaluation
    _verdict(results, sizes)
    (HOME / "results.json").write_text(json.dumps(results, indent=2))


def _verdict(results: dict, sizes: list[int]) -> None:
    rows, ev = results["rows"], results["eval"]
    print(
        "\n| members | cluster on disk | eval peak | search peak | search, resident (before) | similarity peak | trial merge | engine merge |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        r = rows[n]

        def g(kind: str, field: str = "peak_mb", r: dict = r) -> float:
            return r.get(kind, {}).get(field, float("nan"))

        print(
            f"| {n} | {r['cluster_mb']:.0f} MB | {ev['peak_mb'] if ev else float('nan'):.0f} MB | "
            f"{g('search'):.0f} MB | {g('search-resident'):.0f} MB | {g('similarity'):.0f} MB | "
            f"{g('search', 'merge_s_per_trial'):.2f} s | {g('engine', 'seconds'):.2f} s |"
        )
    if ev and all("search" in rows[n] for n in sizes):
        over = max(rows[n]["search"]["peak_mb"] - ev["peak_mb"] for n in sizes)
        print(f"\nsearch peak above evaluation peak: at most {over:.0f} MB (target <= 512)")
        if len(sizes) > 1:
            a, b = rows[sizes[0]]["search"]["peak_mb"], rows[sizes[-1]]["search"]["peak_mb"]
            print(
                f"growth {sizes[0]} -> {sizes[-1]} members: {100 * (b / a - 1):+.1f}% (target <= 10%)"
            )


if __name__ == "__main__":
    main()
