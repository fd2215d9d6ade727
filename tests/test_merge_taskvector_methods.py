"""DELLA, DELLA-linear and SCE: against mergekit 0.1.5, by hand, and statistically.

SCE, and DELLA where its masks are not random (density 0 or 1), must equal mergekit's
output on tiny float32 Llamas of odd shapes (max |difference| <= 1e-5), both tools reading
the same mergekit YAML file. DELLA's random masks cannot equal mergekit's (it draws from
torch's global RNG), so its kept fractions, their dependence on the magnitude rank, the
L1 rescaling and the mean output over seeds are compared within sampling error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_glue.checkpoint import Checkpoint
from model_glue.merge import (
    METHODS,
    MergeConfigError,
    Merger,
    load_merge_config,
    merge_in_memory,
    merge_to_directory,
)
from model_glue.merge.sparsify import magprune_
from tests.factories import fine_tune, run_mergekit, tiny_llama_config

mergekit = pytest.importorskip(
    "mergekit", reason="mergekit 0.1.5 not installed (pip install -e '.[dev]')"
)

# --- tiny Llamas of odd shapes: hidden 24, intermediate 40, 3 layers, vocabulary 61 --------

SHAPE = {"hidden": 24, "intermediate": 40, "layers": 3, "vocab": 61, "heads": 4, "positions": 32}


def _save(path, state):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(**SHAPE))
    model.load_state_dict(state)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and three fine-tunes of different strengths: (states, paths by YAML key)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("odd")
    torch.manual_seed(0)
    sd = LlamaForCausalLM(tiny_llama_config(**SHAPE)).state_dict()
    g = torch.Generator().manual_seed(0)
    base = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()}
    fts = [fine_tune(base, 100 + i, scale) for i, scale in enumerate((0.01, 0.02, 0.03))]
    paths = {"BASE": str(_save(root / "base", base))}
    for i, ft in enumerate(fts):
        paths[f"FT{i}"] = str(_save(root / f"ft{i}", ft))
    return base, fts, paths


def _write(text, paths, tmp_path):
    for key, p in paths.items():
        text = text.replace(key, p)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    return cfg


def _worst(a_dir, b_dir) -> float:
    a, b = Checkpoint(str(a_dir)), Checkpoint(str(b_dir))
    assert set(a.names()) == set(b.names())
    return max(float((a.tensor(n) - b.tensor(n)).abs().max()) for n in a.names())


# --- 1. equal to mergekit where the output is deterministic --------------------------------

DETERMINISTIC = {
    "sce": """
merge_method: sce
base_model: BASE
models:
  - {model: BASE}
  - {model: FT0}
  - {model: FT1}
  - {model: FT2}
dtype: float32
""",
    "sce_topk_0.5": """
merge_method: sce
base_model: BASE
models: [{model: FT0}, {model: FT1}, {model: FT2}]
parameters: {select_topk: 0.5}
dtype: float32
""",
    "sce_topk_gradient": """
merge_method: sce
base_model: BASE
models: [{model: FT0}, {model: FT2}]
parameters: {select_topk: [0.1, 0.9]}
dtype: float32
""",
    "della_density_1": """
merge_method: della
base_model: BASE
models:
  - {model: BASE}
  - {model: FT0, parameters: {weight: 0.7, density: 1.0}}
  - {model: FT1, parameters: {weight: 0.5, density: 1.0, epsilon: 0.4}}
  - {model: FT2, parameters: {weight: 1.0}}
parameters: {lambda: 0.8}
dtype: float32
""",
    "della_density_edges": """
merge_method: della
base_model: BASE
models:
  - {model: FT0, parameters: {weight: 0.7, density: 0.0, epsilon: 0.3}}
  - {model: FT1, parameters: {weight: 0.5, density: [{filter: mlp, value: 0.0}, {value: 1.0}]}}
  - {model: FT2, parameters: {weight: 1.0, density: 1.0, epsilon: 0.5}}
parameters: {normalize: false}
dtype: float32
""",
    "della_linear_density_1": """
merge_method: della_linear
base_model: BASE
models:
  - {model: FT0, parameters: {weight: 0.6, density: 1.0}}
  - {model: FT1, parameters: {weight: [0.2, 1.0], density: 1.0}}
  - {model: FT2, parameters: {weight: 0.4, density: [{filter: self_attn, value: 0.0}, {value: 1.0}]}}
parameters: {lambda: 1.3, normalize: true, rescale: false}
dtype: float32
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_matches_mergekit(name, zoo, tmp_path):
    cfg = _write(DETERMINISTIC[name], zoo[2], tmp_path)
    run_mergekit(cfg, tmp_path / "mk")
    merge_to_directory(load_merge_config(cfg), tmp_path / "ours")
    assert _worst(tmp_path / "ours", zoo[2]["BASE"]) > 1e-3  # a real merge
    worst = _worst(tmp_path / "ours", tmp_path / "mk")
    print(f"{name}: max |ours - mergekit| = {worst:.2e}")
    assert worst <= 1e-5, f"{name}: max |ours - mergekit| = {worst}"


@pytest.mark.slow
@pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.85, 0.15), (0.5, 0.5)])
def test_density_epsilon_outside_0_1_is_refused_by_both(density, epsilon, zoo, tmp_path):
    text = (
        "merge_method: della\nbase_model: BASE\nmodels:\n"
        f"  - {{model: FT0, parameters: {{weight: 1.0, density: {density}, epsilon: {epsilon}}}}}\n"
        "dtype: float32\n"
    )
    cfg = _write(text, zoo[2], tmp_path)
    with pytest.raises(ValueError, match="Epsilon must be chosen"):
        run_mergekit(cfg, tmp_path / "mk")
    with pytest.raises(MergeConfigError) as err:  # ours: when the config is read
        load_merge_config(cfg)
    message = str(err.value)
    assert "\n" not in message and "epsilon=" in message and str(cfg) in message


# --- 2. DELLA's randomness, within sampling error -------------------------------------------


def _mergekit(method, base, models, params, seed):
    """mergekit's own kernel on one tensor, under torch's global seed."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    names = [f"m{i}" for i in range(len(models))]
    group = TensorGroup.from_tensors([base, *models], ids=["base", *names], base_index=0)
    per_model = {k: v for k, v in params.items() if isinstance(v, list)}
    bound = {k: v for k, v in params.items() if not isinstance(v, list)}
    bound.update({k: dict(zip(names, v, strict=True)) for k, v in per_model.items()})
    torch.manual_seed(seed)
    return registry.get(method)([group], parameters=bound)[0]


def _ours(method, base, models, params, seeds):
    """Our merger on one tensor, per seed."""
    per_model = {k: v for k, v in params.items() if isinstance(v, list)}
    glob = {k: v for k, v in params.items() if not isinstance(v, list)}
    mp = [{k: v[i] for k, v in per_model.items()} for i in range(len(models))]
    merger = Merger(method, [{"w": m} for m in models], {"w": base}, params=glob, model_params=mp)
    return [merger(params={"seed": s})["w"] for s in seeds]


RUNS = 20
DENSITY, EPSILON = 0.4, 0.2


@pytest.fixture(scope="module")
def rows():
    """A base and a task vector of 128 rows of 300 entries (no zeros), and the keep masks
    of 20 runs of della_linear without rescaling, ours (seeds) and mergekit's."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(128, 300, generator=g)
    tau = torch.randn(128, 300, generator=g) * torch.rand(128, 300, generator=g).add_(0.1)
    params = {"density": [DENSITY], "epsilon": [EPSILON], "weight": [1.0], "rescale": False}
    theirs = [_mergekit("della_linear", base, [base + tau], params, s) for s in range(RUNS)]
    params["rescale"] = "none"
    ours = _ours("della_linear", base, [base + tau], params, range(RUNS))
    kept = {
        "ours": torch.stack([o != base for o in ours]).float(),
        "mergekit": torch.stack([t != base for t in theirs]).float(),
    }
    return tau, kept


@pytest.mark.slow
def test_kept_fraction_per_row_and_overall_is_the_density(rows):
    tau, kept = rows
    m = tau.shape[1]
    p = DENSITY - EPSILON + 2 * EPSILON * torch.arange(m) / (m - 1)
    var = float((p * (1 - p)).sum())  # of one row's kept count in one run
    for who, k in kept.items():
        overall = float(k.mean())
        se = math.sqrt(var * tau.shape[0] * RUNS) / k.numel()
        per_row = k.mean(dim=(0, 2))
        se_row = math.sqrt(var * RUNS) / (m * RUNS)
        worst = float((per_row - DENSITY).abs().max()) / se_row
        print(
            f"{who}: kept {overall:.5f} (z {(overall - DENSITY) / se:+.2f}), worst row z {worst:.2f}"
        )
        assert abs(overall - DENSITY) < 4 * se
        assert worst < 5  # the largest of 128 rows' |z|


@pytest.mark.slow
def test_keep_probability_rises_with_the_magnitude_rank(rows):
    """Per rank in the row: keep rates on a line from density - epsilon to density +
    epsilon, ours and mergekit's, and equal to each other within sampling error."""
    tau, kept = rows
    m = tau.shape[1]
    rank = tau.abs().argsort(dim=1).argsort(dim=1)  # 0: smallest magnitude in its row
    p = DENSITY - EPSILON + 2 * EPSILON * torch.arange(m, dtype=torch.float64) / (m - 1)
    samples = tau.shape[0] * RUNS
    rates = {}
    for who, k in kept.items():
        rate = torch.zeros(m, dtype=torch.float64)
        rate.scatter_add_(0, rank.view(-1).repeat(RUNS), k.view(-1).double())
        rate /= samples
        rates[who] = rate
        z = (rate - p) / (p * (1 - p) / samples).sqrt()
        slope, intercept = np.polyfit(p.numpy(), rate.numpy(), 1)
        lo, hi = float(rate[: m // 10].mean()), float(rate[-m // 10 :].mean())
        print(
            f"{who}: rate {lo:.4f} (lowest tenth of ranks) .. {hi:.4f} (highest), "
            f"slope {slope:.4f} intercept {intercept:+.4f}, max |z| {float(z.abs().max()):.2f}"
        )
        assert float(z.abs().max()) < 5
        assert abs(slope - 1) < 0.05 and abs(intercept) < 0.02
    var = 2 * p * (1 - p) / samples
    z = (rates["ours"] - rates["mergekit"]) / var.sqrt()
    print(f"ours - mergekit per rank: max |z| {float(z.abs().max()):.2f}")
    assert float(z.abs().max()) < 5


@pytest.mark.slow
def test_l1_rescale_restores_the_task_vector_norm():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 96, generator=g)
    tau = torch.randn(64, 96, generator=g)
    params = {"density": [0.3], "epsilon": [0.1], "weight": [1.0]}
    theirs = _mergekit("della_linear", base, [base + tau], params, 0)
    (ours,) = _ours("della_linear", base, [base + tau], params, [0])
    target = float(tau.abs().sum())
    for who, out in (("ours", ours), ("mergekit", theirs)):
        l1 = float((out - base).abs().sum())
        print(f"{who}: L1 of the kept task vector {l1:.4f}, of the task vector {target:.4f}")
        assert l1 == pytest.approx(target, rel=1e-5)
        assert 0.2 < float((out != base).float().mean()) < 0.4


@pytest.mark.slow
def test_mean_over_seeds_matches_mergekit(zoo):
    """della (sign election, L1 rescale, normalize) on three fine-tunes of two Llama
    matrices and a norm vector: per element, ours over 20 seeds vs mergekit over 20 runs.
    (Over 300 runs each, the per-element differences showed no bias either.)"""
    base_sd, fts, _ = zoo
    params = {"density": [0.5, 0.3, 0.6], "epsilon": [0.15, 0.1, 0.3], "weight": [0.7, 0.5, 1.0]}
    zs = []
    for name in (
        "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        base, models = base_sd[name], [ft[name] for ft in fts]
        ours = torch.stack(_ours("della", base, models, params, range(RUNS))).double()
        theirs = torch.stack(
            [_mergekit("della", base, models, params, s) for s in range(RUNS)]
        ).double()
        se = ((ours.var(0) + theirs.var(0)) / RUNS).sqrt()
        live = se > 0
        zs.append(((ours.mean(0) - theirs.mean(0))[live] / se[live]).view(-1))
    z = torch.cat(zs)
    total = float(z.sum()) / math.sqrt(len(z))
    share = float((z.abs() > 4).float().mean())
    print(
        f"{len(z)} elements: mean z {float(z.mean()):+.4f}, std z {float(z.std()):.3f}, "
        f"sum z / sqrt(n) {total:+.2f}, |z| > 4: {share:.4%}"
    )
    assert abs(total) < 4
    assert 0.85 < float(z.std()) < 1.15
    assert share < 0.005


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_rescale_agrees_with_mergekit_within_sampling_error(zoo, method):
    """DARE with mergekit's ``rescale: true`` (ours: ``rescale: l1``): the kept fraction,
    the restored L1 norm and the mean output over seeds agree with mergekit's runs."""
    base_sd, fts, _ = zoo
    name = "model.layers.1.mlp.down_proj.weight"
    base, models = base_sd[name], [ft[name] for ft in fts]
    params = {"density": [0.5, 0.3, 0.6], "weight": [0.7, 0.5, 1.0]}
    ours = torch.stack(
        _ours(method, base, models, params | {"rescale": "l1", "normalize": False}, range(RUNS))
    ).double()
    theirs = torch.stack(
        [
            _mergekit(method, base, models, params | {"rescale": True, "normalize": False}, s)
            for s in range(RUNS)
        ]
    ).double()
    # one model alone: its kept fraction and its task vector's L1 norm after the rescale
    single = {"density": [0.4], "weight": [1.0]}
    tau = models[0] - base
    mine = _ours("dare_linear", base, [models[0]], single | {"rescale": "l1"}, range(RUNS))
    mk = [
        _mergekit("dare_linear", base, [models[0]], single | {"rescale": True}, s)
        for s in range(RUNS)
    ]
    for outs in (mine, mk):
        kept = torch.stack([(o - base) != 0 for o in outs]).double().mean()
        assert abs(float(kept) - 0.4) < 4 * math.sqrt(0.4 * 0.6 / (RUNS * tau.numel()))
        l1 = torch.stack([(o - base).abs().sum() for o in outs])
        assert torch.allclose(l1, tau.abs().sum().expand(RUNS), rtol=1e-4)
    se = ((ours.var(0) + theirs.var(0)) / RUNS).sqrt()
    live = se > 0
    z = ((ours.mean(0) - theirs.mean(0))[live] / se[live]).view(-1)
    total = float(z.sum()) / math.sqrt(len(z))
    print(f"{method}: {len(z)} elements, sum z / sqrt(n) {total:+.2f}, std z {float(z.std()):.3f}")
    assert abs(total) < 4
    assert 0.8 < float(z.std()) < 1.2
    assert float((z.abs() > 4).float().mean()) < 0.005


# --- DELLA by hand, and reproducibility -----------------------------------------------------


def test_magprune_keeps_by_rank_within_rows_and_rescales_by_each_probability():
    tau = torch.tensor([[1.0, -4.0, 2.0, 3.0], [-8.0, 5.0, 7.0, 6.0]])
    # ranks in their rows: [0, 3, 1, 2] and [3, 0, 2, 1]; density 0.5 +- 0.3: 0.2 .. 0.8
    p = torch.tensor([[0.2, 0.8, 0.4, 0.6], [0.8, 0.2, 0.6, 0.4]])
    p = torch.round(p * 65536) / 65536  # the 16-bit thresholds
    seen = torch.zeros_like(tau)
    for seed in range(4000):
        t = tau.clone()
        magprune_(t, 0.5, 0.3, seed, inverse=True)
        kept = t != 0
        assert torch.allclose(t[kept], (tau / p)[kept])  # each kept entry divided by its p
        seen += kept
    assert torch.allclose(seen / 4000, p, atol=0.03)


def test_magprune_edges_and_row_blocks(monkeypatch):
    import model_glue.merge.sparsify as sparsify

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 33, generator=g)
    same = x.clone()
    assert sparsify.magprune_(same, 1.0, 0.4, 0).p == 1.0 and torch.equal(same, x)
    zero = x.clone()
    sparsify.magprune_(zero, 0.0, 0.4, 0)
    assert not zero.any()
    one_column = torch.randn(40, 1, generator=g)  # mergekit fails here (0/0 ranks)
    sparsify.magprune_(one_column, 0.5, 0.2, 0)
    assert 0 < int(one_column.count_nonzero()) < 40
    whole = x.clone()
    drop = sparsify.magprune_(whole, 0.4, 0.2, 5, measure_l1=True)
    monkeypatch.setattr(sparsify, "_ROW_BLOCK", 33 * 3)  # three rows at a time
    blocks = x.clone()
    assert sparsify.magprune_(blocks, 0.4, 0.2, 5, measure_l1=True) == drop
    assert torch.equal(whole, blocks)


def test_epsilon_zero_keeps_every_entry_with_the_density():
    x = torch.randn(100, 200, generator=torch.Generator().manual_seed(2))
    rank = x.abs().argsort(dim=1).argsort(dim=1)
    small, large = torch.zeros(()), torch.zeros(())
    for seed in range(10):
        t = x.clone()
        magprune_(t, 0.3, 0.0, seed)
        small += (t[rank < 100] != 0).float().mean()
        large += (t[rank >= 100] != 0).float().mean()
    assert abs(float(small) / 10 - 0.3) < 0.01 and abs(float(large) / 10 - 0.3) < 0.01


def test_same_seed_same_bits_streaming_in_memory_and_any_threads(zoo, tmp_path):
    base_sd, fts, paths = zoo
    text = """
merge_method: della
base_model: BASE
models:
  - {model: FT0, parameters: {weight: 0.7, density: 0.5}}
  - {model: FT1, parameters: {weight: 0.5, density: [0.3, 0.6], epsilon: 0.1}}
  - {model: FT2, parameters: {weight: 1.0, density: 0.4}}
parameters: {seed: 11}
dtype: float32
"""
    spec = load_merge_config(_write(text, paths, tmp_path))
    merge_to_directory(spec, tmp_path / "one", threads=1, workers=1)
    merge_to_directory(spec, tmp_path / "two", threads=2, workers=2)
    one, two = Checkpoint(str(tmp_path / "one")), Checkpoint(str(tmp_path / "two"))
    ram = merge_in_memory(spec, fts, base_sd)
    for name in one.names():
        assert torch.equal(one.tensor(name), two.tensor(name)), name
        assert torch.equal(one.tensor(name), ram[name]), name
    names = [m.label for m in spec.models]
    merger = Merger("della", fts, base_sd, names=names, params=dict(spec.params), threads=2)
    model_params = [dict(m.params) for m in spec.models]
    again = merger(model_params=model_params)
    assert all(torch.equal(again[n], ram[n]) for n in ram)
    other = merger(params={"seed": 12}, model_params=model_params)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(other[name], ram[name])


def test_della_linear_by_hand():
    """density 1 keeps the task vectors: della_linear is task arithmetic, della is TIES."""
    base = torch.tensor([[0.0, 1.0, 2.0]])
    a, b = base + torch.tensor([[1.0, -2.0, 0.5]]), base + torch.tensor([[-3.0, 1.0, 0.5]])
    mp = [{"weight": 1.0}, {"weight": 0.5}]
    out = merge_in_memory(
        "della_linear",
        [{"w": a}, {"w": b}],
        {"w": base},
        params={"density": 1.0, "lambda": 2.0},
        model_params=mp,
    )["w"]
    assert torch.allclose(out, base + 2.0 * torch.tensor([[1 - 1.5, -2 + 0.5, 0.5 + 0.25]]))
    ties = merge_in_memory(
        "della", [{"w": a}, {"w": b}], {"w": base}, params={"density": 1.0}, model_params=mp
    )["w"]
    # elected signs of sum w tau = [-0.5, -1.5, 0.75]: [-, -, +]; disjoint means
    assert torch.allclose(ties, base + torch.tensor([[-1.5 / 0.5, -2.0, 0.75 / 1.5]]))


# --- SCE by hand ----------------------------------------------------------------------------


def test_sce_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, -1.0, 0.0])
    b = torch.tensor([3.0, -1.0, -1.0, 0.0])
    out = merge_in_memory("sce", [{"w": a}, {"w": b}], {"w": base})["w"]
    # weights: mean squares 6/4 and 11/4 -> 6/17, 11/17; signs elected by a + b
    wa, wb = 6 / 17, 11 / 17
    expected = torch.tensor([(wa * 1 + wb * 3) / (wa + wb), 2.0, -1.0, 0.0])
    assert torch.allclose(out, expected)
    # select_topk 0.5 of the 3 entries of nonzero variance: int(1.5) = 1, the variance of
    # [1, 3] and of [2, -1] is 1 and 2.25: only entry 1 is kept
    out = merge_in_memory("sce", [{"w": a}, {"w": b}], {"w": base}, params={"select_topk": 0.5})
    assert torch.allclose(out["w"], torch.tensor([0.0, 2.0, 0.0, 0.0]))


# --- 3. declarations, docs and errors -------------------------------------------------------


def test_methods_are_declared_listed_and_documented():
    from pathlib import Path

    from typer.testing import CliRunner

    from glue.cli import app

    listed = CliRunner().invoke(app, ["methods"])
    assert listed.exit_code == 0, listed.output
    for name in ("della", "della_linear", "sce"):
        assert f"{name}:" in listed.output
    doc = (Path(__file__).resolve().parents[1] / "docs" / "merging.md").read_text()
    for name in ("della", "della_linear", "sce"):
        assert f"### `{name}`" in doc
    della, linear, sce = METHODS["della"], METHODS["della_linear"], METHODS["sce"]
    assert della.param("epsilon").default == 0.15 and della.param("epsilon").per_model
    assert della.param("normalize").default is True and linear.param("normalize").default is False
    assert della.param("rescale").default == linear.param("rescale").default == "l1"
    assert [p.name for p in sce.params] == ["select_topk"] and sce.param("select_topk").default == 1


def test_config_errors_are_one_line_naming_the_key(zoo, tmp_path):
    paths = zoo[2]

    def error(text):
        with pytest.raises(MergeConfigError) as err:
            load_merge_config(_write(text, paths, tmp_path))
        assert "\n" not in str(err.value)
        return str(err.value)

    head = "base_model: BASE\nmodels:\n  - {model: FT0, parameters: {density: 0.5}}\n"
    assert "epsilon=0.6 is above its maximum" in error(
        "merge_method: della\n" + head + "parameters: {epsilon: 0.6}\n"
    )
    # a gradient: checked at each breakpoint
    message = error("merge_method: della_linear\n" + head + "parameters: {epsilon: [0.1, 0.5]}\n")
    assert "epsilon=0.5" in message and "model 'ft0'" in message
    assert "no parameter 'topk'" in error(
        "merge_method: sce\n" + head.replace("{density: 0.5}", "{}") + "parameters: {topk: 0.5}\n"
    )
    assert "no parameter 'density'" in error("merge_method: sce\n" + head)
    assert "select_topk=1.5 is above" in error(
        "merge_method: sce\nbase_model: BASE\nmodels: [{model: FT0}]\nparameters: {select_topk: 1.5}\n"
    )
    assert "rescale='l2' is not one of" in error(
        "merge_method: della\n" + head + "parameters: {rescale: l2}\n"
    )


def test_filtered_epsilon_is_refused_per_tensor_before_anything_is_written(zoo, tmp_path):
    base_sd, fts, paths = zoo
    text = """
merge_method: della
base_model: BASE
models:
  - {model: FT0, parameters: {density: 0.5, epsilon: [{filter: mlp, value: 0.5}, {value: 0.1}]}}
"""
    spec = load_merge_config(_write(text, paths, tmp_path))  # not knowable without names
    with pytest.raises(MergeConfigError, match=r"tensor 'model\.layers\.0\.mlp.*epsilon=0\.5"):
        merge_to_directory(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeConfigError, match="epsilon=0.5"):
        merge_in_memory(spec, fts[:1], base_sd)
