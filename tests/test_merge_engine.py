"""The streaming engine end to end on tiny Llama checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model_glue.checkpoint import Checkpoint
from model_glue.merge import (
    MergeConfigError,
    MergeInputError,
    MergeSpec,
    ModelInput,
    load_merge_config,
    merge_in_memory,
    merge_to_directory,
    run_merge_file,
)
from tests.factories import fine_tune, merge_zoo, random_state, save_llama


def read_all(path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(str(path))
    return {n: ck.tensor(n) for n in ck.names()}


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base, fts, bpath, paths = merge_zoo(root, 2, shard="20KB")  # sharded inputs
    return base, fts, bpath, paths


def test_streaming_equals_in_memory_and_loads_with_transformers(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, fts, bpath, paths = tiny_zoo
    spec = MergeSpec(
        "ties",
        [
            ModelInput(str(p), f"ft{i}", {"weight": w})
            for i, (p, w) in enumerate(zip(paths, (0.7, 0.3), strict=True))
        ],
        base=str(bpath),
        params={"density": [0.3, 0.8]},
    )
    seen = []
    result = merge_to_directory(
        spec,
        tmp_path / "out",
        shard_size=30_000,
        input_fingerprints={"base": "fp-b", "ft0": "fp-0", "ft1": "fp-1"},
        progress=lambda d, t: seen.append((d, t)),
        card_extra={"cluster": "c0"},
    )
    out = tmp_path / "out"
    assert len(result.shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert seen[-1][0] == seen[-1][1] == result.num_tensors
    streamed = read_all(out)
    expected = merge_in_memory(spec, fts, base)
    assert streamed.keys() == expected.keys()
    for k in expected:
        assert torch.equal(streamed[k], expected[k]), k
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["lm_head.weight"], expected["lm_head.weight"])
    assert AutoTokenizer.from_pretrained(out)("!!").input_ids == [1, 1]
    card = (out / "README.md").read_text()
    assert "fp-0" in card and "ties" in card and "cluster: c0" in card and "density" in card
    assert result.content_key == spec.content_key({"base": "fp-b", "ft0": "fp-0", "ft1": "fp-1"})
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_depth_gradient_changes_per_layer_density(tiny_zoo):
    base, fts, _, _ = tiny_zoo
    out = merge_in_memory("ties", fts[:1], base, params={"density": [0.1, 1.0]}, names=["a"])
    name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    kept0 = (out[name0] != base[name0]).float().mean().item()
    kept1 = (out[name1] != base[name1]).float().mean().item()
    assert kept0 == pytest.approx(0.1, abs=0.01) and kept1 == 1.0


def test_output_dtype_defaults_to_inputs_and_can_be_set(tmp_path):
    base = random_state(1)
    ft = fine_tune(base, 5)
    b = save_llama(tmp_path / "b", base, dtype=torch.bfloat16)
    f = save_llama(tmp_path / "f", ft, dtype=torch.bfloat16)
    spec = MergeSpec("task_arithmetic", [ModelInput(str(f))], base=str(b), params={"lambda": 0.5})
    merge_to_directory(spec, tmp_path / "o1")
    t = load_file(tmp_path / "o1" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    # float32 accumulation, one rounding at the end
    b16 = {k: v.to(torch.bfloat16).float() for k, v in base.items()}
    f16 = {k: v.to(torch.bfloat16).float() for k, v in ft.items()}
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(t[k], (b16[k] + 0.5 * (f16[k] - b16[k])).to(torch.bfloat16))
    spec32 = MergeSpec("task_arithmetic", [ModelInput(str(f))], base=str(b), dtype="float32")
    merge_to_directory(spec32, tmp_path / "o2")
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["dtype"] == "float32"
    assert load_file(tmp_path / "o2" / "model.safetensors")[k].dtype == torch.float32


def test_vocabulary_mismatch_error_truncate_and_pad(tmp_path):
    small = random_state(1, vocab=64)
    big = {k: v.clone() for k, v in small.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        big[k] = torch.cat([small[k], torch.randn(8, small[k].shape[1])])
    s = save_llama(tmp_path / "small", small, vocab=64)
    g = save_llama(tmp_path / "big", fine_tune(big, 3), vocab=72)
    models = [ModelInput(str(s)), ModelInput(str(g))]
    with pytest.raises(MergeInputError, match="vocabulary sizes differ.*small: 64, big: 72"):
        merge_to_directory(MergeSpec("linear", models), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    merge_to_directory(MergeSpec("linear", models, vocab="truncate"), tmp_path / "t")
    out = read_all(tmp_path / "t")
    assert out["lm_head.weight"].shape[0] == 64
    assert json.loads((tmp_path / "t" / "config.json").read_text())["vocab_size"] == 64
    assert "truncated" in (tmp_path / "t" / "README.md").read_text()
    with pytest.raises(MergeInputError, match="have fewer"):
        merge_to_directory(
            MergeSpec("linear", models, vocab="truncate", tokenizer_source="big"), tmp_path / "y"
        )
    merge_to_directory(
        MergeSpec("linear", models, vocab="pad", tokenizer_source="big"), tmp_path / "p"
    )
    out = read_all(tmp_path / "p")
    bigft = read_all(g)
    # rows 64..71 exist only in 'big': the small model contributes big's rows there
    assert torch.allclose(out["lm_head.weight"][64:], bigft["lm_head.weight"][64:])


def test_bad_inputs_name_model_and_tensor(tmp_path, tiny_zoo):
    _, _, bpath, paths = tiny_zoo
    other = random_state(2, layers=3)
    o = save_llama(tmp_path / "deeper", other, layers=3)
    with pytest.raises(MergeInputError, match="'deeper' has extra tensors"):
        merge_to_directory(
            MergeSpec("task_arithmetic", [ModelInput(str(o))], base=str(bpath)), tmp_path / "x"
        )
    with pytest.raises(Exception, match="does not exist"):
        merge_to_directory(
            MergeSpec("linear", [ModelInput(str(tmp_path / "nope"))]), tmp_path / "y"
        )
    with pytest.raises(FileExistsError):
        merge_to_directory(MergeSpec("linear", [ModelInput(str(paths[0]))]), tmp_path)


@pytest.mark.parametrize("workers", [1, 3])
def test_failures_mid_merge_leave_nothing_behind(tmp_path, workers):
    """A truncated input (caught when opened, naming the file) and a method error (raised in
    a worker thread, naming the tensor) leave no output and no temporary directory."""
    import shutil

    from model_glue.checkpoint import CheckpointError

    base, fts, bpath, paths = merge_zoo(tmp_path / "zoo", 2)
    cut = tmp_path / "cut"
    shutil.copytree(paths[1], cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 5000])
    models = [ModelInput(str(paths[0]), "a"), ModelInput(str(cut), "cut")]
    with pytest.raises(CheckpointError, match="truncated"):
        merge_to_directory(
            MergeSpec("ties", models, base=str(bpath), params={"density": 0.5}),
            tmp_path / "out",
            workers=workers,
        )
    zero_sum = [
        ModelInput(str(paths[0]), "a", {"weight": 1.0}),
        ModelInput(str(paths[1]), "b", {"weight": -1.0}),
    ]
    with pytest.raises(ValueError, match="weights sum to 0"):
        merge_to_directory(MergeSpec("linear", zero_sum), tmp_path / "out", workers=workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "zoo"]


def test_yaml_configs_ours_and_mergekit(tmp_path, tiny_zoo):
    base, fts, bpath, paths = tiny_zoo
    ours = tmp_path / "ours.yaml"
    ours.write_text(
        f"method: task_arithmetic\nbase: {bpath}\nmodels:\n"
        f"  - {{uri: {paths[0]}, name: a, params: {{weight: 0.5}}}}\n  - {paths[1]}\nparams: {{lambda: 0.8}}\n"
    )
    mk = tmp_path / "mk.yaml"
    mk.write_text(
        f"merge_method: task_arithmetic\nbase_model: {bpath}\nmodels:\n  - model: {bpath}\n"
        f"  - model: {paths[0]}\n    parameters: {{weight: 0.5}}\n  - model: {paths[1]}\n    parameters: {{weight: 1.0}}\n"
        "parameters: {lambda: 0.8}\ndtype: float32\n"
    )
    a, b = load_merge_config(ours), load_merge_config(mk)
    assert [m.uri for m in a.models] == [m.uri for m in b.models] == [str(p) for p in paths]
    out = run_merge_file(str(ours), str(tmp_path / "o"), progress=False)
    merged = read_all(out)
    k = "model.norm.weight"
    assert torch.allclose(
        merged[k], base[k] + 0.8 * (0.5 * (fts[0][k] - base[k]) + (fts[1][k] - base[k]))
    )
    again = load_merge_config(out / "merge_config.yaml")
    assert again.canonical() == a.canonical()
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nmodels: [x]\nparams: {density: 2}\nbase: y\n")
    with pytest.raises(MergeConfigError, match=r"bad.yaml: params.density: density=2.0 is above"):
        load_merge_config(bad)


def test_canonical_is_stable_and_explicit():
    a = MergeSpec(
        "ties",
        [ModelInput("/x/a"), ModelInput("/x/b", params={"weight": 1})],
        base="/x/base",
        params={"density": 0.5},
    )
    b = MergeSpec(
        "ties",
        [ModelInput("/y/a", params={"weight": 1.0}), ModelInput("/y/b")],
        base="/y/base",
        params={"density": 0.5, "lambda": 1, "normalize": True},
    )
    assert a.canonical() == b.canonical()  # defaults explicit, locations excluded
    assert a.canonical()["models"][0]["params"] == {"weight": 1.0, "density": 0.5}
    fps = {"base": "1", "a": "2", "b": "3"}
    assert a.content_key(fps) == b.content_key(fps) != a.content_key({**fps, "b": "4"})


def test_dare_is_reproducible_from_its_seed_streaming_and_in_memory(tiny_zoo, tmp_path):
    base, fts, bpath, paths = tiny_zoo
    models = [ModelInput(str(p), f"ft{i}") for i, p in enumerate(paths)]
    spec = MergeSpec("dare_ties", models, base=str(bpath), params={"density": 0.3, "seed": 7})
    merge_to_directory(spec, tmp_path / "a")
    merge_to_directory(spec, tmp_path / "b", shard_size=10_000)  # other sharding, same masks
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    mem = merge_in_memory(spec, fts, base)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], mem[k]), k
    other = merge_in_memory(
        MergeSpec("dare_ties", models, base=str(bpath), params={"density": 0.3, "seed": 8}),
        fts,
        base,
    )
    assert not torch.equal(other["lm_head.weight"], mem["lm_head.weight"])


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "ties", "task_arithmetic"])
def test_chunked_and_parallel_merges_equal_the_in_memory_merge(tmp_path, method):
    """Tensors larger than a chunk take the engine's chunked path (DARE's ``l1`` rescale:
    a first pass sums the norms, the masks it drew are reused) and are merged on several
    workers; results equal the whole-tensor in-memory merge bit for bit."""
    from model_glue.merge.registry import CHUNK

    vocab = CHUNK // 32 + 500  # hidden size 32: embeddings and lm_head exceed a chunk
    base, fts, bpath, paths = merge_zoo(tmp_path / "zoo", 2, vocab=vocab)
    assert base["model.embed_tokens.weight"].numel() > CHUNK
    params = {
        "dare_ties": {"density": 0.4, "seed": 3, "rescale": "l1"},
        "dare_linear": {"density": 0.4, "seed": 3},  # inverse_density: no first pass
        "ties": {"density": 0.4},
        "task_arithmetic": {},
    }[method]
    spec = MergeSpec(
        method,
        [
            ModelInput(str(p), f"ft{i}", {"weight": w})
            for i, (p, w) in enumerate(zip(paths, (0.6, 0.9), strict=True))
        ],
        base=str(bpath),
        params=params,
    )
    mem = merge_in_memory(spec, fts, base)
    for workers in (1, 3):
        out = tmp_path / f"out-{workers}"
        merge_to_directory(spec, out, workers=workers)
        got = read_all(out)
        for k in mem:
            assert torch.equal(got[k], mem[k]), (workers, k)


def test_fsspec_inputs(tiny_zoo, tmp_path):
    import fsspec

    base, fts, bpath, paths = tiny_zoo
    fs = fsspec.filesystem("memory")
    for src, name in ((bpath, "base"), (paths[0], "ft0")):
        for f in src.iterdir():
            fs.pipe(f"/mg-test/{name}/{f.name}", f.read_bytes())
    spec = MergeSpec(
        "task_arithmetic", [ModelInput("memory://mg-test/ft0")], base="memory://mg-test/base"
    )
    merge_to_directory(spec, tmp_path / "o")
    out = read_all(tmp_path / "o")
    local = merge_in_memory("task_arithmetic", [fts[0]], base)
    assert all(torch.equal(out[k], local[k]) for k in local)
    fs.rm("/mg-test", recursive=True)


def test_threads_setting_is_restored(tiny_zoo, tmp_path):
    _, _, bpath, paths = tiny_zoo
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not the merge's 1 (the tests run on one thread)
    try:
        merge_to_directory(
            MergeSpec("linear", [ModelInput(str(p)) for p in paths]), tmp_path / "o", threads=1
        )
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_glue_merge_command(tiny_zoo, tmp_path):
    """`glue merge CONFIG OUT [--workers N]` on a mergekit-style config; errors name the key."""
    from typer.testing import CliRunner

    from glue.cli import app

    base, fts, bpath, paths = tiny_zoo
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: dare_ties\nbase_model: {bpath}\nmodels:\n"
        f"  - {{model: {paths[0]}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
        f"  - {{model: {paths[1]}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
        "dtype: bfloat16\n"
    )
    runner = CliRunner()
    one = runner.invoke(app, ["merge", str(config), str(tmp_path / "w1"), "--workers", "1"])
    two = runner.invoke(app, ["merge", str(config), str(tmp_path / "w2")])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    a, b = read_all(tmp_path / "w1"), read_all(tmp_path / "w2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["lm_head.weight"].dtype == torch.bfloat16
    config.write_text(config.read_text().replace("density: 0.5}", "densty: 0.5}", 1))
    bad = runner.invoke(app, ["merge", str(config), str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "densty" in bad.output
    assert not (tmp_path / "bad").exists()


def test_default_workers_shrink_when_memory_is_short(tiny_zoo, tmp_path, monkeypatch):
    """Two workers by default; one when the largest tensors on two would need more than
    half the available memory (a 70B TIES merge on a small machine, say)."""
    import model_glue.merge.engine as engine
    from model_glue.merge.engine import _plan, choose_workers, job_bytes

    _, _, bpath, paths = tiny_zoo
    spec = MergeSpec(
        "ties", [ModelInput(str(p)) for p in paths], base=str(bpath), params={"density": 0.5}
    )
    checkpoints = [Checkpoint(uri) for _, uri in spec.inputs()]
    plan = _plan(spec, checkpoints)
    held = max(job_bytes(plan, checkpoints, j)[1] for j in plan.jobs)
    read = max(job_bytes(plan, checkpoints, j)[0] for j in plan.jobs)
    monkeypatch.setattr(engine, "default_workers", lambda: 2)
    assert choose_workers(plan, checkpoints, available=10 * (2 * held + 2 * read)) == 2
    assert choose_workers(plan, checkpoints, available=2 * held + 2 * read) == 1
    monkeypatch.setattr(engine, "available_memory", lambda: held)
    result = merge_to_directory(spec, tmp_path / "out")
    assert result.workers == 1
    assert merge_to_directory(spec, tmp_path / "out2", workers=3).workers == 3  # asked for
