"""Merge benchmark: our engine against mergekit 0.1.5 on three ~188M-parameter Llamas.

    .venv/bin/python bench/merge_bench.py [--methods linear,ties,dare_ties] [--repeat 3]
                                          [--deltas dense|sparse|bf16-repeated]

Inputs (a base and two fine-tunes, random, bfloat16; hidden 1024, 12 layers,
intermediate 2816, 16 heads, vocabulary 16384) are generated once under
``$GLUE_HOME/bench/inputs`` (``inputs-<deltas>`` for the other kinds). ``--deltas`` says
what the fine-tunes' task vectors look like: ``dense`` (every element moved by Gaussian
noise), ``sparse`` (embeddings and lm_head frozen, 70% of the other elements exactly
unchanged: about 70% exact zeros in every task vector, as partial fine-tunes give) or
``bf16-repeated`` (every element moved by 1-3 bfloat16 steps: a few distinct magnitudes
per exponent, as small bf16 updates give). Each run is a fresh child process that imports its tool, then
times the merge itself and reports its own peak resident memory; the wall time of the
whole child (interpreter start and imports included, what a CLI user waits) is reported
too, split into start-up (interpreter start and imports, config read), merge and exit
(interpreter shutdown). The "ours" child does what ``glue merge`` (``run_merge_file``)
does, progress output aside. The "floor" child only reads the three inputs and writes one output. Ratios come
from one script run, on one machine state: the load average is printed with them. With
``--repeat N`` the tools run N times each, interleaved, and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CHILD_START = time.time()  # first thing in the child: start-up is measured from here

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_glue.env import configure_environment  # noqa: E402

HOME = configure_environment() / "bench"
DELTAS = ("dense", "sparse", "bf16-repeated")
_KIND = os.environ.get("GLUE_BENCH_DELTAS", "dense")  # the child reads it for "floor"
INPUTS = HOME / ("inputs" if _KIND == "dense" else f"inputs-{_KIND}")
NAMES = ("base", "ft_a", "ft_b")
CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n"
    "  - {model: BASE, parameters: {weight: 0.4}}\n  - {model: FT_A, parameters: {weight: 0.3}}\n"
    "  - {model: FT_B, parameters: {weight: 0.3}}\ndtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: BASE\nmodels:\n"
    "  - {model: FT_A, parameters: {weight: 0.5, density: 0.5}}\n  - {model: FT_B, parameters: {weight: 0.5, density: 0.5}}\n"
    "dtype: bfloat16\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: BASE\nmodels:\n"
    "  - {model: FT_A, parameters: {weight: 0.5, density: 0.5}}\n  - {model: FT_B, parameters: {weight: 0.5, density: 0.5}}\n"
    "dtype: bfloat16\n",
    "della": "merge_method: della\nbase_model: BASE\nmodels:\n"
    "  - {model: FT_A, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}\n"
    "  - {model: FT_B, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}\ndtype: bfloat16\n",
    "della_linear": "merge_method: della_linear\nbase_model: BASE\nmodels:\n"
    "  - {model: FT_A, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}\n"
    "  - {model: FT_B, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}\ndtype: bfloat16\n",
    "sce": "merge_method: sce\nbase_model: BASE\nmodels:\n  - {model: FT_A}\n  - {model: FT_B}\n"
    "parameters: {select_topk: 0.5}\ndtype: bfloat16\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n"
    "  - {model: FT_A, parameters: {weight: 0.6}}\n  - {model: FT_B, parameters: {weight: 0.4}}\n"
    "dtype: bfloat16\n",
    "multislerp": "merge_method: multislerp\nmodels:\n"
    "  - {model: BASE, parameters: {weight: 0.4}}\n  - {model: FT_A, parameters: {weight: 0.3}}\n"
    "  - {model: FT_B, parameters: {weight: 0.3}}\ndtype: bfloat16\n",
    "karcher": "merge_method: karcher\nmodels:\n  - {model: BASE}\n  - {model: FT_A}\n  - {model: FT_B}\n"
    "dtype: bfloat16\n",
    "nearswap": "merge_method: nearswap\nbase_model: BASE\nmodels:\n  - {model: FT_A}\n"
    "parameters: {t: 0.001}\ndtype: bfloat16\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: BASE\nmodels:\n  - {model: FT_A}\n"
    "dtype: bfloat16\n",
    # SOLAR-style depth up-scaling of the base: layers [0, 8) then [4, 12), 16 layers
    "slices": "slices:\n  - sources: [{model: BASE, layer_range: [0, 8]}]\n"
    "  - sources: [{model: BASE, layer_range: [4, 12]}]\nmerge_method: passthrough\ndtype: bfloat16\n",
}
RANDOM = ("dare_ties", "della", "della_linear")  # masks differ between the tools by design


def make_inputs(deltas: str = "dense") -> None:
    """Random bf16 Llamas written straight with safetensors (no slow weight init)."""
    if all((INPUTS / n / "model.safetensors").exists() for n in NAMES):
        return
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=1024,
        num_hidden_layers=12,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=16384,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.02
        base[k] = (t + 1.0 if k.endswith("norm.weight") else t).to(torch.bfloat16)

    def fine_tune(k: str, v: torch.Tensor) -> torch.Tensor:
        if deltas == "dense":
            return (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
        if deltas == "sparse":
            if "embed_tokens" in k or "lm_head" in k:
                return v.clone()  # frozen
            moved = (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
            return torch.where(torch.rand(v.shape, generator=g) < 0.3, moved, v)
        # bf16-repeated: 1-3 steps of the bf16 grid up or down
        steps = torch.randint(1, 4, v.shape, generator=g, dtype=torch.int16)
        steps *= torch.randint(0, 2, v.shape, generator=g, dtype=torch.int16) * 2 - 1
        return (v.view(torch.int16) + steps).view(torch.bfloat16)

    for i, name in enumerate(NAMES):
        sd = base if i == 0 else {k: fine_tune(k, v) for k, v in base.items()}
        out = INPUTS / name
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(out)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(
        f"inputs: {sum(v.numel() for v in base.values()) / 1e6:.1f}M parameters each, in {INPUTS}"
    )


def child(tool: str, config: str, out: str) -> None:
    """Run one merge in this process and print its phases and peak memory as JSON."""
    if tool == "ours":
        from model_glue.merge import load_merge_config, merge_to_directory
        from model_glue.merge.run import freeze_imported_objects

        spec = load_merge_config(config)
        freeze_imported_objects()  # as `glue merge` does
        ready = time.time()
        t0 = time.perf_counter()
        merge_to_directory(spec, out)
    elif tool == "mergekit":
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(config).read_text()))
        ready = time.time()
        t0 = time.perf_counter()
        run_merge(
            cfg,
            out,
            MergeOptions(random_seed=0, copy_tokenizer=False, write_model_card=False, quiet=True),
        )
    elif tool == "floor":
        # Every byte of the three inputs read (not memory-mapped and left untouched) and
        # one model's worth of bytes written: what any merge must at least do.
        ready = time.time()
        t0 = time.perf_counter()
        Path(out).mkdir(parents=True, exist_ok=True)
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        with open(Path(out) / "model.safetensors", "wb") as dst:
            for i, n in enumerate(NAMES):
                with open(INPUTS / n / "model.safetensors", "rb", buffering=0) as src:
                    while got := src.readinto(buf):
                        if i == 0:
                            dst.write(view[:got])
    else:
        raise SystemExit(f"unknown tool {tool}")
    merge_s = time.perf_counter() - t0
    peak_mb = peak_resident_mb()
    stamps = {"child_start": CHILD_START, "ready": ready, "done": time.time()}
    print(json.dumps({"merge_s": merge_s, "peak_mb": peak_mb, **stamps}), flush=True)


def peak_resident_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` rather than ``ru_maxrss``: on Linux
    the latter carries the parent's peak across fork and exec, so a child started by a
    bench that has loaded models would report at least the bench's own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_child(tool: str, config: Path, out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    spawned = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", tool, str(config), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    wall = time.perf_counter() - t0
    ended = time.time()
    if proc.returncode:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    phases = {
        "startup_s": res.pop("ready") - spawned,  # interpreter start, imports, config
        "exit_s": ended - res.pop("done"),  # interpreter shutdown
        "interpreter_s": res.pop("child_start") - spawned,  # of startup_s
    }
    return {**res, **phases, "process_s": wall}


def median_run(runs: list[dict]) -> dict:
    """Per-field medians of repeated runs (with the merge-time range when repeated)."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["merge_range_s"] = (min(r["merge_s"] for r in runs), max(r["merge_s"] for r in runs))
    return out


def compare(a: Path, b: Path) -> dict:
    import torch

    from model_glue.checkpoint import Checkpoint

    ca, cb = Checkpoint(str(a)), Checkpoint(str(b))
    differ = total = 0
    worst = 0.0
    for n in ca.names():
        x, y = ca.tensor(n).float(), cb.tensor(n).float()
        d = (x - y).abs()
        differ += int(torch.count_nonzero(d > 1e-2))
        total += d.numel()
        worst = max(worst, float(d.max()))
    return {"share_over_1e-2": differ / total, "max_abs": worst}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; medians reported")
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "CONFIG", "OUT"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot of the last run")
    ap.add_argument("--deltas", choices=DELTAS, default="dense", help="what task vectors look like")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.plot_only:
        print(plot(json.loads((HOME / "results.json").read_text()), HOME / "merge_bench.png"))
        return
    if args.deltas != _KIND:  # module-level paths follow the kind: rerun with it set
        os.environ["GLUE_BENCH_DELTAS"] = args.deltas
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    make_inputs(args.deltas)
    work = HOME / "runs"
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}, {os.cpu_count()} CPUs")
    results: dict = {"load_before": os.getloadavg(), "deltas": args.deltas}
    for method in args.methods.split(","):
        text = CONFIGS[method]
        for key, name in (("BASE", "base"), ("FT_A", "ft_a"), ("FT_B", "ft_b")):
            text = text.replace(key, str(INPUTS / name))
        cfg = work / f"{method}.yaml"
        cfg.write_text(text)
        runs = {"floor": [], "mergekit": [], "ours": []}
        for _ in range(args.repeat):  # interleaved, so that load drifts hit every tool
            runs["floor"].append(timed_child("floor", Path("-"), work / "floor"))
            runs["mergekit"].append(timed_child("mergekit", cfg, work / f"{method}-mergekit"))
            runs["ours"].append(timed_child("ours", cfg, work / f"{method}-ours"))
        floor, mk, ours = (median_run(runs[k]) for k in ("floor", "mergekit", "ours"))
        row = {
            "ours": ours,
            "mergekit": mk,
            "speedup_merge": mk["merge_s"] / ours["merge_s"],
            "speedup_process": mk["process_s"] / ours["process_s"],
            "floor_s": floor["merge_s"],
            "floor_ratio": ours["merge_s"] / floor["merge_s"],
            # what a merge doing no work beyond reading and writing, in a process that
            # imports torch as ours does, could reach over mergekit's process
            "bound_speedup_process": mk["process_s"]
            / (ours["startup_s"] + floor["merge_s"] + ours["exit_s"]),
            "load": os.getloadavg(),
            "runs": runs,
        }
        if method not in RANDOM:
            row["diff"] = compare(work / f"{method}-ours", work / f"{method}-mergekit")
        results[method] = row
        print(
            f"{method:10s} ours {ours['merge_s']:6.2f} s ({ours['process_s']:5.1f} s process, {ours['peak_mb']:5.0f} MB) | "
            f"mergekit {mk['merge_s']:6.2f} s ({mk['process_s']:5.1f} s, {mk['peak_mb']:5.0f} MB) | "
            f"speedup {row['speedup_merge']:4.1f}x merge, {row['speedup_process']:4.1f}x process | "
            f"{row['floor_ratio']:.2f}x floor ({floor['merge_s']:.2f} s) | diff {row.get('diff', '-')} | load {row['load'][0]:.1f}\n"
            f"{'':10s} start-up / exit: ours {ours['startup_s']:.2f} / {ours['exit_s']:.2f} s, "
            f"mergekit {mk['startup_s']:.2f} / {mk['exit_s']:.2f} s | "
            f"process speed-up bound (our start-up + floor + exit) {row['bound_speedup_process']:.1f}x"
            + (
                f" | merge range ours {ours['merge_range_s'][0]:.2f}-{ours['merge_range_s'][1]:.2f} s, "
                f"mergekit {mk['merge_range_s'][0]:.2f}-{mk['merge_range_s'][1]:.2f} s"
                if args.repeat > 1
                else ""
            ),
            flush=True,
        )
    suffix = "" if args.deltas == "dense" else f"-{args.deltas}"
    (HOME / f"results{suffix}.json").write_text(json.dumps(results, indent=2))
    print(f"plot: {plot(results, HOME / f'merge_bench{suffix}.png')}")


def plot(results: dict, out: Path) -> Path:
    """Stacked bars per method and tool: start-up, merge call and exit, with the speed-ups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in results if m not in ("load_before", "deltas")]
    fig, ax = plt.subplots(figsize=(8.0, 0.9 + 1.1 * len(methods)))
    labels, y = [], 0.0
    for method in methods:
        row = results[method]
        for tool, color in (("mergekit", "tab:orange"), ("ours", "tab:blue")):
            r = row[tool]
            left = 0.0  # start-up (grey), merge call, exit (light grey)
            for width, c in ((r["startup_s"], "0.75"), (r["merge_s"], color), (r["exit_s"], "0.9")):
                ax.barh(y, width, left=left, color=c, edgecolor="black", linewidth=0.4)
                left += width
            text = f"{r['process_s']:.1f} s"
            if tool == "ours":
                text += (
                    f"  ({row['speedup_merge']:.1f}x merge, {row['speedup_process']:.1f}x process; "
                    f"read-write floor {row['floor_s']:.2f} s)"
                )
            ax.text(left + 0.3, y, text, va="center", fontsize=8)
            labels.append((y, f"{method} · {tool}"))
            y += 1
        y += 0.5
    ax.set_yticks([p for p, _ in labels], [n for _, n in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (grey: interpreter start and imports; light: exit)")
    ax.set_title(
        f"merge_bench: ours vs mergekit 0.1.5, three 188M bf16 Llamas ({results.get('deltas', 'dense')} task vectors)"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    main()
