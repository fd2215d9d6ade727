"""Zoo scale: fingerprint + sketch, similarity from sketches and clustering for N models.

    .venv/bin/python bench/zoo_scale.py [--sizes 30,100,300,1000] [--exact-up-to 100]

A simulated zoo of one small architecture (Llama, hidden 256, 4 layers, intermediate 688,
vocabulary 512, bfloat16: 3.7M parameters, 7.4 MB a model): families of 10 to 50 fine-tunes
of random bases, each fine-tune its base plus Gaussian noise of 5% to 60% of the weights'
scale (cosines from about 0.95 down to 0.6 within a family, about 0 across). The zoo is
generated once under ``$GLUE_HOME/bench/zoo_scale`` (the first N models are the zoo of N).

Each size runs in a fresh child process (peak memory is the child's): every model is read
once to hash it and sketch it (``fingerprint_and_sketch``), the similarity matrices come
from the sketches (``sketch_matrices``, block by block), and the auto threshold and complete
linkage (``cluster_matrix``) cluster the group. Where ``N <= --exact-up-to`` another child
runs the exact pass (every checkpoint read again, ``pairwise_similarity``) and the clusters
are compared. Then "add one": the bytes read when one more model joins the zoo of 300.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_glue.env import configure_environment  # noqa: E402

HOME = configure_environment() / "bench" / "zoo_scale"
ZOO = HOME / "models"
SHAPE = {"hidden": 256, "layers": 4, "intermediate": 688, "vocab": 512, "heads": 4}


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["heads"],
        vocab_size=SHAPE["vocab"],
        tie_word_embeddings=False,
    )


def make_zoo(n: int) -> list[Path]:
    """The first ``n`` models of the simulated zoo (generated once, then reused)."""
    import random

    import torch
    from safetensors.torch import save_file

    ZOO.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in ZOO.iterdir() if (p / "model.safetensors").exists())
    if len(names) >= n:
        return [ZOO / x for x in names[:n]]
    from transformers import LlamaForCausalLM

    config = _config()
    shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    rng = random.Random(0)
    i = family = 0
    while i < n:
        size = rng.randint(10, 50)
        g = torch.Generator().manual_seed(1000 + family)
        base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        for j in range(size):
            if i >= n:
                break
            path = ZOO / f"m{i:05d}-f{family:03d}"
            if not (path / "model.safetensors").exists():
                path.mkdir(exist_ok=True)
                scale = 0.05 + 0.55 * rng.random() if j else 0.0
                state = {
                    k: (v + scale * 0.02 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                    for k, v in base.items()
                }
                save_file(state, str(path / "model.safetensors"))
                config.to_json_file(path / "config.json")
            i += 1
        family += 1
    return [ZOO / x for x in sorted(p.name for p in ZOO.iterdir())[:n]]


def peak_mb() -> float:
    """The child's peak resident set (the kernel's high-water mark, which counts the pages
    of mapped files while they are mapped; files written and read back with explicit
    reads stay in the kernel's page cache, outside it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clusters_of(names: list[str], matrix) -> tuple[float, list]:
    import numpy as np

    from model_glue.clustering import auto_threshold, cluster_matrix

    m = matrix.numpy().astype(np.float64)
    upper = m[np.triu_indices(len(names), 1)]
    cut = auto_threshold(upper.tolist()).threshold
    return cut, [list(c) for c, _ in cluster_matrix(names, m, cut)]


def child_sketch(n: int) -> dict:
    """Fingerprint and sketch N models, similarity from the sketches, clusters."""
    import tempfile

    from model_glue.checkpoint import Checkpoint
    from model_glue.fingerprint import fingerprint_and_sketch
    from model_glue.similarity import sketch_matrices
    from model_glue.sketch import (
        MAX_SIGMAS,
        SketchSettings,
        exact_tensors,
        load_sketch,
        predicted_error,
        save_sketch,
    )

    paths = make_zoo(n)
    names = [p.name for p in paths]
    settings = SketchSettings()
    out: dict = {"n": n}
    with tempfile.TemporaryDirectory(dir=HOME) as tmp:
        t0 = time.perf_counter()
        read = sketched = 0
        for p in paths:
            ck = Checkpoint(str(p))
            _, sk = fingerprint_and_sketch(ck, settings)
            read += sum(t.nbytes for t in ck.tensors.values())
            save_sketch(sk, Path(tmp) / f"{p.name}.safetensors", settings)
            sketched += (Path(tmp) / f"{p.name}.safetensors").stat().st_size
        out["fingerprint_s"] = time.perf_counter() - t0
        out["fingerprint_read_bytes"] = read
        out["sketch_bytes"] = sketched
        layout = Checkpoint(str(paths[0])).layout
        shapes = {k: t.shape for k, t in Checkpoint(str(paths[0])).tensors.items()}
        exact = exact_tensors(layout, shapes, settings)
        out["exact_matrices"] = len(exact)
        out["compared_matrices"] = len(layout.select(["attn", "mlp"]))
        out["predicted_bound"] = MAX_SIGMAS * predicted_error(layout, shapes, settings, exact)
        t1 = time.perf_counter()
        loaded = [0]

        def load(name: str):
            loaded[0] += (Path(tmp) / f"{name}.safetensors").stat().st_size
            return load_sketch(Path(tmp) / f"{name}.safetensors")

        matrices = sketch_matrices(names, load, layout, workdir=tmp)
        out["similarity_s"] = time.perf_counter() - t1
        out["similarity_read_checkpoint_bytes"] = 0
        out["similarity_read_sketch_bytes"] = loaded[0]
        t2 = time.perf_counter()
        out["threshold"], out["clusters"] = clusters_of(names, matrices["sim_all"])
        out["cluster_s"] = time.perf_counter() - t2
        out["sim_all"] = matrices["sim_all"].tolist()
        if n == 300:
            out["add_one"] = _add_one(paths, tmp, settings, layout)
    out["peak_mb"] = peak_mb()
    return out


def _add_one(paths: list[Path], tmp: str, settings, layout) -> dict:
    """Model 301 joins: the checkpoint bytes read (counted at the reads) to place it."""
    import model_glue.fingerprint as fingerprint
    from model_glue.checkpoint import Checkpoint
    from model_glue.similarity import sketch_matrices
    from model_glue.sketch import load_sketch, save_sketch

    read: dict[str, int] = {}
    digest, tensor = fingerprint._tensor_digest, Checkpoint.tensor

    def hashed(ckpt, name, *args):
        read[ckpt.uri] = read.get(ckpt.uri, 0) + ckpt.tensors[name].nbytes
        return digest(ckpt, name, *args)

    def counted(self, name):
        read[self.uri] = read.get(self.uri, 0) + self.tensors[name].nbytes
        return tensor(self, name)

    fingerprint._tensor_digest, Checkpoint.tensor = hashed, counted
    try:
        new = make_zoo(301)[-1]
        t0 = time.perf_counter()
        _, sk = fingerprint.fingerprint_and_sketch(Checkpoint(str(new)), settings)
        save_sketch(sk, Path(tmp) / f"{new.name}.safetensors", settings)
        names = [p.name for p in paths] + [new.name]
        sketch_matrices(names, lambda n: load_sketch(Path(tmp) / f"{n}.safetensors"), layout)
        seconds = time.perf_counter() - t0
    finally:
        fingerprint._tensor_digest, Checkpoint.tensor = digest, tensor
    return {"read": read, "seconds": seconds}


def child_exact(n: int) -> dict:
    """The exact pass: every pair from the checkpoints (each read again)."""
    import torch

    from model_glue.checkpoint import Checkpoint
    from model_glue.similarity import pairwise_similarity

    paths = make_zoo(n)
    names = [p.name for p in paths]
    cks = {p.name: Checkpoint(str(p)) for p in paths}
    t0 = time.perf_counter()
    result = pairwise_similarity(cks)
    seconds = time.perf_counter() - t0
    m = torch.eye(n)
    for (a, b), row in result.summary.items():
        i, j = names.index(a), names.index(b)
        m[i, j] = m[j, i] = row["sim_all"]
    read = sum(ck.tensors[t].nbytes for ck in cks.values() for t in result.tensors)
    threshold, clusters = clusters_of(names, m)
    return {
        "n": n,
        "similarity_s": seconds,
        "read_bytes": read,
        "threshold": threshold,
        "clusters": clusters,
        "sim_all": m.tolist(),
        "peak_mb": peak_mb(),
    }


def child_stages(n: int) -> dict:
    """The pipeline's own stages (called without Prefect): fingerprint (with sketches)
    into an artifact store, similarity of the group, clustering with threshold auto."""
    import json as _json
    import tempfile

    from tasks.cluster import cluster_zoo
    from tasks.fingerprint import fingerprint_model
    from tasks.similarity import compute_similarity

    paths = make_zoo(n)
    out: dict = {"n": n}
    with tempfile.TemporaryDirectory(dir=HOME) as tmp:
        url = str(Path(tmp) / "store")
        t0 = time.perf_counter()
        recs = [fingerprint_model.fn(store_url=url, name=p.name, uri=str(p)) for p in paths]
        out["fingerprint_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        sim = compute_similarity.fn(store_url=url, models=recs, groups=["attn", "mlp"])
        out["similarity_s"] = time.perf_counter() - t1
        out["exact_pairs"] = sim["exact_pairs"]
        out["listed_pairs"] = len(sim["pairs"]) // 4
        out["record_mb"] = len(_json.dumps(sim)) / 1e6
        t2 = time.perf_counter()
        clusters = cluster_zoo.fn(
            store_url=url,
            models=recs,
            similarity_keys=[sim["key"]],
            metric="sim_all",
            threshold="auto",
        )
        out["cluster_s"] = time.perf_counter() - t2
        out["n_clusters"] = len(clusters["clusters"])
    out["peak_mb"] = peak_mb()
    return out


def run_child(kind: str, n: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(n)], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{kind} {n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="30,100,300,1000")
    ap.add_argument("--exact-up-to", type=int, default=100)
    ap.add_argument("--stages", default="", help="sizes to run through the pipeline's stages")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "N"))
    args = ap.parse_args()
    if args.child:
        kind, n = args.child[0], int(args.child[1])
        child = {"sketch": child_sketch, "exact": child_exact, "stages": child_stages}[kind]
        print(json.dumps(child(n)))
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    t0 = time.perf_counter()
    make_zoo(max(max(sizes), 301))
    print(f"zoo ready in {time.perf_counter() - t0:.0f} s: {SHAPE}, bf16", flush=True)
    rows = []
    for n in sizes:
        s = run_child("sketch", n)
        row = {k: v for k, v in s.items() if k not in ("sim_all", "clusters")}
        row["n_clusters"] = len(s["clusters"])
        line = (
            f"N={n:5d} sketch: fingerprint {s['fingerprint_s']:6.1f} s "
            f"({s['fingerprint_read_bytes'] / 1e9:.2f} GB read; sketches "
            f"{s['sketch_bytes'] / s['fingerprint_read_bytes']:.1%} of it), similarity {s['similarity_s']:6.1f} s "
            f"(0 checkpoint bytes, {s['similarity_read_sketch_bytes'] / 1e6:.0f} MB of sketches), "
            f"cluster {s['cluster_s']:5.2f} s, {row['n_clusters']} clusters, peak {s['peak_mb']:.0f} MB"
            f"\n{'':8s}{s['exact_matrices']} of {s['compared_matrices']} compared matrices kept "
            f"exactly, predicted worst sim_all error {s['predicted_bound']:.4f}"
        )
        if n <= args.exact_up_to:
            e = run_child("exact", n)
            worst = max(
                abs(a - b)
                for ra, rb in zip(s["sim_all"], e["sim_all"], strict=True)
                for a, b in zip(ra, rb, strict=True)
            )
            row["exact"] = {k: v for k, v in e.items() if k not in ("sim_all", "clusters")}
            row["same_clusters"] = s["clusters"] == e["clusters"]
            row["worst_sim_all_error"] = worst
            line += (
                f"\n{'':8s}exact: similarity {e['similarity_s']:6.1f} s ({e['read_bytes'] / 1e9:.2f} GB "
                f"read), peak {e['peak_mb']:.0f} MB; same clusters: {row['same_clusters']}, "
                f"worst sim_all error {worst:.4f}, thresholds {s['threshold']:.3f} / {e['threshold']:.3f}"
            )
        print(line, flush=True)
        rows.append(row)
    for row in rows:
        if "add_one" in row:
            add = row["add_one"]
            print(
                f"add one model to the zoo of 300: {len(add['read'])} checkpoint read "
                f"({sum(add['read'].values()) / 1e6:.1f} MB: {', '.join(Path(u).name for u in add['read'])}),"
                f" its similarities to the 300 from sketches, {add['seconds']:.1f} s"
            )
    for n in [int(x) for x in args.stages.split(",") if x]:
        r = run_child("stages", n)
        print(
            f"N={n:5d} stages: fingerprint {r['fingerprint_s']:6.1f} s, similarity "
            f"{r['similarity_s']:6.1f} s ({r['exact_pairs']} pairs exact near the threshold, "
            f"{r['listed_pairs']} pairs listed, record {r['record_mb']:.1f} MB), cluster "
            f"{r['cluster_s']:5.2f} s, {r['n_clusters']} clusters, peak {r['peak_mb']:.0f} MB",
            flush=True,
        )
        rows.append({"stages": r})
    (HOME / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
