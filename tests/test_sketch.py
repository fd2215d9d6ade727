"""Sketches (model_glue/sketch.py): made from the bytes fingerprinting reads, and
similarities estimated from them within the tolerance of the exact pass."""

from __future__ import annotations

import pytest
import torch

from model_glue.architectures.tiny import save_tiny
from model_glue.checkpoint import Checkpoint
from model_glue.fingerprint import fingerprint_and_sketch, fingerprint_checkpoint
from model_glue.similarity import pairwise_similarity, sketch_similarity
from model_glue.sketch import (
    SketchSettings,
    rows_name,
    sketch_bytes,
    sketch_tensor,
    sketched_tensors,
)

METRICS = ("sim_all", "sim_attn", "sim_mlp", "flat_cosine", "task_vector_cosine")


def _family(root, arch: str, noises=(0.02, 0.1, 0.3, 1.0)) -> dict[str, Checkpoint]:
    """A base, fine-tunes at several distances from it, and an unrelated model."""
    base = save_tiny(root / f"{arch}-base", arch, seed=0, layers=2)
    paths = {"base": base, "other": save_tiny(root / f"{arch}-other", arch, seed=99, layers=2)}
    for i, noise in enumerate(noises):
        paths[f"ft{noise}"] = save_tiny(
            root / f"{arch}-ft{i}", arch, seed=10 + i, base=base, noise=noise
        )
    return {n: Checkpoint(str(p)) for n, p in paths.items()}


def _sketches(cks: dict[str, Checkpoint], settings: SketchSettings) -> dict[str, dict]:
    return {n: fingerprint_and_sketch(ck, settings)[1] for n, ck in cks.items()}


def test_the_sketch_comes_from_the_hashing_read_and_leaves_the_fingerprint_alone(tmp_path):
    ck = Checkpoint(str(save_tiny(tmp_path / "m", "GPT2LMHeadModel", seed=1, dtype="bfloat16")))
    settings = SketchSettings(k=8, seed=3)
    fp, sketches = fingerprint_and_sketch(ck, settings)
    assert fp == fingerprint_checkpoint(ck)
    names = sketched_tensors(ck.layout)
    assert sorted(sketches) == sorted(names + [rows_name(t) for t in names])
    projected = 0
    for name in names:  # Conv1D [in, out]: the sketch is over input columns
        s = sketches[name]
        direct = sketch_tensor(ck.layout, name, ck.tensor(name), settings)
        assert torch.equal(s, direct)
        rows, cols = ck.layout.input_columns(name, ck.tensor(name)[None]).shape[-2:]
        assert s.shape == ((8 if rows > 32 else rows), cols)  # small matrices kept exactly
        projected += rows > 32
    assert projected > 0


@pytest.mark.parametrize(("k", "tolerance"), [(32, 1e-6), (4, 0.05)])
def test_sketched_similarities_are_within_tolerance_of_the_exact_pass(tmp_path, k, tolerance):
    """k = 32 keeps the catalog's tiny matrices exactly (at most 4k rows); k = 4 projects
    them: a few columns per matrix, the worst case for the projection's error."""
    for arch in ("LlamaForCausalLM", "GPT2LMHeadModel", "Qwen3ForCausalLM"):
        cks = _family(tmp_path / arch, arch)
        exact = pairwise_similarity(cks, base=cks["base"])
        sk = _sketches(cks, SketchSettings(k=k))
        est = sketch_similarity(sk, cks["base"].layout, base=("base", sk["base"]))
        worst = {
            m: max(abs(est.summary[p][m] - exact.summary[p][m]) for p in exact.summary)
            for m in METRICS
        }
        assert worst["sim_all"] <= tolerance, (arch, worst)
        assert all(v <= 3 * tolerance for v in worst.values()), (arch, worst)
        # the ordering that clustering reads: near fine-tunes above far ones above strangers
        near, far = est.value("base", "ft0.02"), est.value("base", "ft1.0")
        assert near > far > est.value("base", "other")


def test_a_sketch_is_linear_and_small(tmp_path):
    cks = _family(tmp_path, "LlamaForCausalLM", noises=(0.1,))
    settings = SketchSettings(k=4)
    sk = _sketches(cks, settings)
    layout = cks["base"].layout
    for t in sketched_tensors(layout):
        delta = cks["ft0.1"].tensor(t).float() - cks["base"].tensor(t).float()
        tau = sketch_tensor(layout, t, delta, settings)
        assert torch.allclose(tau, sk["ft0.1"][t] - sk["base"][t], atol=1e-5)
    weights = sum(cks["base"].tensors[t].nbytes for t in sketched_tensors(layout))
    assert sketch_bytes(sk["base"].values()) < weights / 2  # k = 4 of 16+ rows, float32


@pytest.mark.slow
def test_on_the_demo_zoo_k32_is_within_0_005_of_the_exact_pass(demo_zoo):
    """The demo zoo's 128-wide models: the MLP's 344-row matrices are projected."""
    cks = {p.name: Checkpoint(str(p)) for p in sorted((demo_zoo / "models").iterdir())}
    exact = pairwise_similarity(cks)
    est = sketch_similarity(_sketches(cks, SketchSettings(k=32)), next(iter(cks.values())).layout)
    worst = max(abs(est.summary[p]["sim_all"] - exact.summary[p]["sim_all"]) for p in exact.summary)
    print(f"demo zoo, {len(exact.summary)} pairs: worst sim_all error {worst:.4f}")
    assert worst <= 0.005


def test_blockwise_matrices_equal_the_pairwise_estimates(tmp_path):
    """sketch_matrices (memory-mapped vectors, Gram block by block) gives the values of
    sketch_similarity for every pair, whatever the block size."""
    from model_glue.similarity import sketch_matrices

    cks = _family(tmp_path, "Qwen3ForCausalLM")
    sk = _sketches(cks, SketchSettings(k=4))
    names = sorted(sk)
    est = sketch_similarity(sk, cks["base"].layout)
    for block in (1, 2, 64):
        m = sketch_matrices(names, sk.__getitem__, cks["base"].layout, block=block)
        for (a, b), row in est.summary.items():
            i, j = names.index(a), names.index(b)
            for metric in ("sim_all", "sim_attn", "sim_mlp", "flat_cosine"):
                assert abs(float(m[metric][i, j]) - row[metric]) < 1e-4, (block, metric)
                assert float(m[metric][j, i]) == float(m[metric][i, j])


def test_stored_float16_sketches_keep_task_vector_cosines(tmp_path):
    """Sketches are stored in float16 (half the bytes); a task vector's sketch is a
    difference of two of them, and its cosine stays within 0.005 for a 1% fine-tune."""
    from model_glue.sketch import load_sketch, save_sketch

    cks = _family(tmp_path, "LlamaForCausalLM", noises=(0.01, 0.02, 0.1))
    exact = pairwise_similarity(cks, base=cks["base"])
    settings = SketchSettings(k=32)
    stored = {}
    for n, sk in _sketches(cks, settings).items():
        save_sketch(sk, tmp_path / f"{n}.safetensors", settings)
        stored[n] = load_sketch(tmp_path / f"{n}.safetensors")
    assert stored["base"][next(iter(sketched_tensors(cks["base"].layout)))].dtype == torch.float16
    est = sketch_similarity(stored, cks["base"].layout, base=("base", stored["base"]))
    for p in exact.summary:
        for m in ("sim_all", "task_vector_cosine"):
            assert abs(est.summary[p][m] - exact.summary[p][m]) < 0.005, (p, m)
