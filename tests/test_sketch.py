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
    settings = SketchSettings(k=8, seed=3, budget=None)  # every matrix of > 4k rows projected
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
    """k = 32 keeps the catalog's tiny matrices exactly (at most 4k rows); k = 4 without
    the error budget projects them: a few columns per matrix, the worst case for the
    projection's error."""
    for arch in ("LlamaForCausalLM", "GPT2LMHeadModel", "Qwen3ForCausalLM"):
        cks = _family(tmp_path / arch, arch)
        exact = pairwise_similarity(cks, base=cks["base"])
        sk = _sketches(cks, SketchSettings(k=k, budget=None))
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
    settings = SketchSettings(k=4, budget=None)
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
    """sketch_matrices (float16 files read back block by block) gives the values of
    sketch_similarity for every pair, whatever the block sizes."""
    from model_glue.similarity import sketch_matrices

    cks = _family(tmp_path, "Qwen3ForCausalLM")
    sk = _sketches(cks, SketchSettings(k=4, budget=None))
    names = sorted(sk)
    est = sketch_similarity(sk, cks["base"].layout)
    for block, memory in ((1, 0), (2, 0), (2, 2**30), (64, 2**30)):
        m = sketch_matrices(names, sk.__getitem__, cks["base"].layout, block=block, memory=memory)
        for (a, b), row in est.summary.items():
            i, j = names.index(a), names.index(b)
            for metric in ("sim_all", "sim_attn", "sim_mlp", "flat_cosine"):
                assert abs(float(m[metric][i, j]) - row[metric]) < 1e-4, (block, memory, metric)
                assert float(m[metric][j, i]) == float(m[metric][i, j])


def test_sketches_of_different_versions_are_refused_in_one_line(tmp_path):
    """One model's matrix kept exactly, another's projected (an older sketch): refused."""
    from model_glue.similarity import SimilarityError, sketch_matrices

    cks = _family(tmp_path, "LlamaForCausalLM", noises=(0.1,))
    layout = cks["base"].layout
    sk = _sketches(cks, SketchSettings(k=4, budget=None))
    old = _sketches({"base": cks["base"]}, SketchSettings(k=4))["base"]
    assert any(old[t].shape != sk["base"][t].shape for t in sketched_tensors(layout))
    sk["base"] = old
    with pytest.raises(SimilarityError, match="different settings or versions"):
        sketch_matrices(sorted(sk), sk.__getitem__, layout)


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


def _llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int = 512) -> dict:
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{r}_proj.weight": (hidden, hidden) for r in "qkvo"}
        shapes |= {p + f"mlp.{r}_proj.weight": (intermediate, hidden) for r in ("gate", "up")}
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes |= {p + f"{r}_layernorm.weight": (hidden,) for r in ("input", "post_attention")}
    return shapes


def _llama_config(hidden: int, intermediate: int, layers: int, vocab: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


def _layout(hidden: int, intermediate: int, layers: int, vocab: int = 512):
    from model_glue.architectures import resolve_layout

    shapes = _llama_shapes(hidden, intermediate, layers, vocab)
    config = _llama_config(hidden, intermediate, layers, vocab).to_dict()
    return resolve_layout(config, shapes), shapes


def test_the_error_budget_keeps_exact_what_small_layouts_need_and_nothing_at_7b():
    from model_glue.sketch import ERROR_BUDGET, MAX_SIGMAS, exact_tensors, predicted_error

    settings = SketchSettings()
    layout, shapes = _layout(4096, 11008, 32, vocab=32000)  # Llama-2 7B
    assert exact_tensors(layout, shapes, settings) == frozenset()  # everything projected
    assert MAX_SIGMAS * predicted_error(layout, shapes, settings) < ERROR_BUDGET / 5

    layout, shapes = _layout(256, 688, 4)  # bench/zoo_scale.py's models
    exact = exact_tensors(layout, shapes, settings)
    assert MAX_SIGMAS * predicted_error(layout, shapes, settings) > ERROR_BUDGET
    assert MAX_SIGMAS * predicted_error(layout, shapes, settings, exact) <= ERROR_BUDGET
    for t in exact:  # the least that meets the budget (here every kept matrix weighs alike)
        assert MAX_SIGMAS * predicted_error(layout, shapes, settings, exact - {t}) > ERROR_BUDGET
    attn = set(layout.select(["attn"]))
    assert attn <= exact  # the smallest matrices (256 x 256) first
    assert not any(t.endswith("down_proj.weight") for t in exact)  # 688 columns: last
    assert 0 < len(exact - attn) < 8  # then a few of the 688 x 256 gate/up matrices

    # the same layout, whatever the vocabulary or the order of the tensors, keeps the same
    other, other_shapes = _layout(256, 688, 4, vocab=777)
    reordered = dict(reversed(list(other_shapes.items())))
    assert exact_tensors(other, reordered, settings) == exact
    assert exact_tensors(layout, shapes, SketchSettings(budget=None)) == frozenset()


def _random_llama(path, seed: int, hidden: int, intermediate: int, layers: int) -> Checkpoint:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = _llama_shapes(hidden, intermediate, layers, vocab=64)
    path.mkdir(parents=True)
    save_file(
        {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()},
        str(path / "model.safetensors"),
    )
    _llama_config(hidden, intermediate, layers, vocab=64).to_json_file(path / "config.json")
    return Checkpoint(str(path))


def test_the_predicted_error_bounds_the_sketch_error_between_unrelated_models(tmp_path):
    """Unrelated random models, 160 wide (every matrix projected without the budget): the
    sketch's sim_all errors have the predicted spread, the worst of 91 pairs lies within
    MAX_SIGMAS of it, and with the budget within ERROR_BUDGET."""
    from model_glue.similarity import sketch_matrices
    from model_glue.sketch import (
        ERROR_BUDGET,
        MAX_SIGMAS,
        exact_tensors,
        load_sketch,
        predicted_error,
        save_sketch,
    )

    cks = {f"m{i:02d}": _random_llama(tmp_path / f"m{i}", i, 160, 320, 2) for i in range(14)}
    names = sorted(cks)
    layout = cks["m00"].layout
    shapes = {n: t.shape for n, t in cks["m00"].tensors.items()}
    exact = pairwise_similarity(cks).summary
    for settings in (SketchSettings(budget=None), SketchSettings()):
        chosen = exact_tensors(layout, shapes, settings)
        sigma = predicted_error(layout, shapes, settings, chosen)
        stored = {}
        for n, sk in _sketches(cks, settings).items():  # float16, as the store keeps them
            save_sketch(sk, tmp_path / f"{n}-{settings.budget}.safetensors", settings)
            stored[n] = load_sketch(tmp_path / f"{n}-{settings.budget}.safetensors")
        for t in chosen:
            assert stored["m00"][t].shape == layout.input_columns(t, cks["m00"].tensor(t)).shape
        m = sketch_matrices(names, stored.__getitem__, layout)["sim_all"]
        errors = torch.tensor(
            [float(m[names.index(a), names.index(b)]) - v["sim_all"] for (a, b), v in exact.items()]
        )
        rms = float(errors.square().mean().sqrt())
        print(
            f"budget {settings.budget}: {len(chosen)} exact, predicted sigma {sigma:.5f}, "
            f"rms error {rms:.5f}, worst {float(errors.abs().max()):.5f}"
        )
        assert 0.75 * sigma <= rms <= 1.25 * sigma
        assert float(errors.abs().max()) <= MAX_SIGMAS * sigma
        if settings.budget is None:
            assert not chosen and MAX_SIGMAS * sigma > ERROR_BUDGET
        else:
            assert chosen and MAX_SIGMAS * sigma <= ERROR_BUDGET
