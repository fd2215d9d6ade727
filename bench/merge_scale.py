"""Streaming at scale: peak memory of a merge against the size of the models it merges.

    .venv/bin/python bench/merge_scale.py [--methods ties,dare_ties,linear] [--layers 22]

Inputs: a base and two fine-tunes shaped like TinyLlama-1.1B by default (hidden 2048,
22 layers, intermediate 5632, 32 heads, vocabulary 32000), random, bfloat16, written as
1 GB safetensors shards with an index, once, under ``$GLUE_HOME/bench/scale/<shape>``
(about 6.6 GB of disk for the default shape). Each merge runs in a fresh child process
that reports its wall time and peak resident memory (``VmHWM``); the table compares that
peak with one model's bytes and with the three inputs' bytes. A merge that loaded its
inputs would need at least the inputs' bytes; the streaming engine needs a few tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge_bench import peak_resident_mb  # noqa: E402  (bench/ is the script's directory)

from model_glue.env import configure_environment  # noqa: E402

HOME = configure_environment() / "bench" / "scale"
NAMES = ("base", "ft_a", "ft_b")
CONFIGS = {
    "linear": "method: linear\nmodels: [FT_A, FT_B]\n",
    "ties": "method: ties\nbase: BASE\nmodels: [FT_A, FT_B]\nparams: {density: 0.5}\n",
    "dare_ties": "method: dare_ties\nbase: BASE\nmodels: [FT_A, FT_B]\n"
    "params: {density: 0.5, rescale: l1}\n",
}


def make_inputs(root: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> None:
    """Random bf16 Llamas written shard by shard (at most one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if all((root / n / "model.safetensors.index.json").exists() for n in NAMES):
        return
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    shard_bytes = 1 << 30
    for i, name in enumerate(NAMES):
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)  # the same base draws for every model
        noise = torch.Generator().manual_seed(100 + i)
        shards: list[dict] = [{}]
        size = 0
        for k, s in shapes.items():
            t = torch.randn(s, generator=g) * 0.02
            if k.endswith("norm.weight"):
                t += 1.0
            if i:
                t += 0.002 * torch.randn(s, generator=noise)
            t = t.to(torch.bfloat16)
            if shards[-1] and size + t.numel() * 2 > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += t.numel() * 2
            if size >= shard_bytes:
                shards.append({})
                size = 0
        shards = [s for s in shards if s]
        files = [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
        weight_map = {}
        for f, shard in zip(files, shards, strict=True):
            save_file(shard, str(out / f), metadata={"format": "pt"})
            weight_map |= {k: f for k in shard}
        total = sum(v.numel() * 2 for s in shards for v in s.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg.save_pretrained(out)
        print(f"wrote {out} ({total / 1e9:.2f} GB in {len(shards)} shards)", flush=True)


def child(config: str, out: str) -> None:
    from model_glue.merge import load_merge_config, merge_to_directory

    t0 = time.perf_counter()
    result = merge_to_directory(load_merge_config(config), out)
    seconds = time.perf_counter() - t0
    peak = peak_resident_mb()
    print(json.dumps({"merge_s": seconds, "peak_mb": peak, "workers": result.workers}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="ties,dare_ties,linear")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    import shutil

    shape = f"h{args.hidden}-l{args.layers}-i{args.intermediate}-v{args.vocab}"
    root = HOME / shape
    make_inputs(root, args.hidden, args.layers, args.intermediate, args.vocab)
    model_mb = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors")) / 2**20
    results = {"shape": shape, "model_mb": model_mb, "methods": {}}
    print(f"{shape}: one model {model_mb:.0f} MB, three inputs {3 * model_mb:.0f} MB")
    for method in args.methods.split(","):
        text = CONFIGS[method]
        for key, name in (("BASE", "base"), ("FT_A", "ft_a"), ("FT_B", "ft_b")):
            text = text.replace(key, str(root / name))
        cfg = root / f"{method}.yaml"
        cfg.write_text(text)
        out = root / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(cfg), str(out)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        shards = len(list(out.glob("*.safetensors")))
        shutil.rmtree(out)
        r |= {"peak_over_model": r["peak_mb"] / model_mb, "out_shards": shards}
        results["methods"][method] = r
        print(
            f"{method:10s} {r['merge_s']:6.1f} s, peak {r['peak_mb']:6.0f} MB "
            f"= {r['peak_over_model']:.2f}x one model, {r['peak_mb'] / (3 * model_mb):.2f}x the "
            f"inputs ({r['workers']} workers, {shards} output shards)",
            flush=True,
        )
    (HOME / f"{shape}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
