"""nuslerp, multislerp, karcher, nearswap and arcee_fusion: formulas by hand, against
mergekit 0.1.5 (same YAML file, every mode, degenerate inputs), streaming against the
in-memory merger bit for bit, their declarations in the CLI, the docs and the configs.

The tiny Llamas have odd shapes (hidden 24, intermediate 40, 3 layers, vocabulary 61) and
values on a 2^-12 grid, so that sums and differences are exact: an "antiparallel" model
(``2 base - ft0``) has exactly the opposite task vector, which is where spherical formulas
switch branches and any rounding difference would show.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model_glue.checkpoint import Checkpoint
from model_glue.merge import (
    METHODS,
    MergeConfigError,
    MergeSpec,
    ModelInput,
    load_merge_config,
    merge_in_memory,
    merge_to_directory,
)
from model_glue.merge.registry import CHUNK
from tests.factories import run_mergekit, tiny_llama_config

T = torch.tensor
NEW = ("arcee_fusion", "karcher", "multislerp", "nearswap", "nuslerp")


def run(method, models, base=None, params=None, model_params=None):
    sds = [{"w": m.clone()} for m in models]
    b = {"w": base.clone()} if base is not None else None
    return merge_in_memory(method, sds, b, params=params, model_params=model_params)["w"]


# --- formulas by hand ----------------------------------------------------------------------


def test_nuslerp_interpolates_on_the_circle_and_takes_task_vectors_against_a_base():
    a, b = T([[1.0, 0.0], [0.0, 2.0]]), T([[0.0, 1.0], [0.0, -2.0]])
    # flattened: one angle; |a| = |b| = sqrt(5), cos = -4/5
    theta = math.acos(-0.8)
    expect = (math.sin(0.75 * theta) * a + math.sin(0.25 * theta) * b) / math.sin(theta)
    out = run("nuslerp", [a, b], model_params=[{"weight": 3.0}, {"weight": 1.0}])
    assert torch.allclose(out, expect, atol=1e-6)
    # per row (vectors along the last dimension): row 0 at 90 degrees, row 1 antiparallel
    # (linear); row_wise: per column, column 0 has a zero vector (cos 0, 90 degrees)
    rows = run("nuslerp", [a, b], params={"nuslerp_flatten": False})
    s = math.sin(math.pi / 4)
    assert torch.allclose(rows, T([[s, s], [0.0, 0.0]]), atol=1e-6)
    cols = run("nuslerp", [a, b], params={"nuslerp_flatten": False, "nuslerp_row_wise": True})
    assert torch.allclose(cols[:, 0], T([s, 0.0]), atol=1e-6)
    theta = math.acos(-2 / math.sqrt(5))  # column 1: (0, 2) against (1, -2)
    col1 = T([1.0, 0.0]) * math.sin(theta / 2) / math.sin(theta)
    assert torch.allclose(cols[:, 1], col1, atol=1e-6)
    base = T([[5.0, 5.0], [5.0, 5.0]])
    shifted = run("nuslerp", [a + base, b + base], base, params={"nuslerp_flatten": False})
    assert torch.allclose(shifted, rows + base, atol=1e-5)


def test_multislerp_is_the_spherical_mean_scaled_to_the_mean_norm():
    x, y = T([3.0, 0.0]), T([0.0, 1.0])
    out = run("multislerp", [x, y], model_params=[{"weight": 1.0}, {"weight": 1.0}])
    # unit vectors (1, 0) and (0, 1): mean direction (1, 1)/sqrt 2, mean norm (3 + 1) / 2
    assert torch.allclose(out, T([1.0, 1.0]) * 2 / math.sqrt(2), atol=1e-6)
    base = T([1.0, 1.0])
    assert torch.allclose(run("multislerp", [x + base, y + base], base), out + base, atol=1e-6)
    # without normalize_weights the norm is sum_i w_i |x_i|: 2 * 3 + 2 * 1
    raw = run("multislerp", [x, y], params={"normalize_weights": False, "weight": 2.0})
    assert torch.allclose(raw, 4 * out, atol=1e-5)
    # one model: the model itself; cancelling antipodes: the weighted sum (the base)
    assert torch.equal(run("multislerp", [x + base], base), x + base)
    assert torch.equal(run("multislerp", [base + x, base - x, base + x, base - x], base), base)
    with pytest.raises(ValueError, match="sum to 0"):
        run("multislerp", [x, y], model_params=[{"weight": 1.0}, {"weight": -1.0}])


def test_karcher_mean_of_points_on_a_great_circle_is_their_middle():
    angles = [0.0, 0.3, 1.2]
    pts = [
        T([math.cos(a), math.sin(a), 0.0]) * r for a, r in zip(angles, (1.0, 2.0, 3.0), strict=True)
    ]
    out = run("karcher", pts, params={"max_iter": 50, "tol": 1e-9})
    # on a circle the Karcher mean is the mean angle; the norm is the mean norm
    mid = sum(angles) / 3
    assert torch.allclose(out, 2.0 * T([math.cos(mid), math.sin(mid), 0.0]), atol=1e-5)
    assert torch.equal(run("karcher", [pts[1]]), pts[1])
    zeros = run("karcher", [torch.zeros(3), torch.zeros(3)])
    assert torch.equal(zeros, torch.zeros(3))
    # a zero model adds no direction, only its zero norm to the average
    assert torch.allclose(run("karcher", [torch.zeros(3), pts[2]]), pts[2] / 2, atol=1e-6)
    # max_iter 0: the normalised mean of the unit vectors, no Riemannian step
    flat = run("karcher", pts, params={"max_iter": 0})
    units = sum(p / p.norm() for p in pts)
    assert torch.allclose(flat, 2.0 * units / units.norm(), atol=1e-6)


def test_nearswap_takes_the_model_where_it_is_near_the_base():
    base, model = T([0.0, 0.0, 0.0, 1.0]), T([0.05, 0.4, -1.0, 1.0])
    out = run("nearswap", [model], base, params={"t": 0.1})
    # weights clamp(0.1 / |d|, 0, 1) = 1, 0.25, 0.1, 1 (d = 0: clamped at 1e-6)
    assert torch.allclose(out, T([0.05, 0.1, -0.1, 1.0]))


def test_arcee_fusion_keeps_the_changes_of_outlier_importance():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 50, generator=g)
    model = base + 1e-3 * torch.randn(8, 50, generator=g)
    model[2, 7] += 5.0  # a large change that moves row 2's softmax
    out = run("arcee_fusion", [model], base)
    # by hand: importance |model - base| * KL(softmax(model row) || softmax(base row)),
    # the fence median + 1.5 IQR of the sorted importances at floor(q (n - 1))
    p, q = torch.softmax(model, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (model - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ranked = importance.flatten().sort().values
    q1, median, q3 = (ranked[int(f * 399)] for f in (0.25, 0.5, 0.75))
    kept = importance >= median + 1.5 * (q3 - q1)
    assert kept[2, 7] and 0 < int(kept.sum()) < 400
    assert torch.equal(out, torch.where(kept, model, base))
    # identical inputs: every importance is 0, the fence 0, the result the base
    assert torch.equal(run("arcee_fusion", [base], base), base)


def test_chunked_methods_stream_chunks_to_the_same_bits_as_whole_tensors():
    """multislerp and karcher sum their Gram matrix over CHUNK-aligned blocks, nearswap is
    elementwise: the engine's chunks give the whole tensor's result exactly."""
    from model_glue.merge.registry import TensorContext, merge_chunks

    n = 2 * CHUNK + 1234
    g = torch.Generator().manual_seed(0)
    base = 0.05 * torch.randn(n, generator=g)
    fts = [base + 0.02 * torch.randn(n, generator=g) for _ in range(3)]
    names = ("a", "b", "c")
    cases = [
        ("multislerp", fts, base, {"weight": (0.3, 0.5, 0.9), "normalize_weights": True}),
        ("multislerp", fts, None, {"weight": (0.3, 0.5, 0.9), "normalize_weights": False}),
        ("karcher", fts, None, {"max_iter": 10, "tol": 1e-5}),
        ("nearswap", fts[:1], base, {"t": 0.01}),
    ]
    for name, models, b, values in cases:
        method = METHODS[name]
        assert method.chunked
        values = {"eps": 1e-8, **values}
        ctx = TensorContext("w", names[: len(models)])
        whole = method.fn(
            None if b is None else b.clone(), [m.clone() for m in models], values, ctx
        )
        out = torch.empty(n)

        def chunk(start, stop, b=b, models=models):
            part = None if b is None else b[start:stop].clone()
            return part, [m[start:stop].clone() for m in models]

        merge_chunks(method, "w", names[: len(models)], n, chunk, values, out)
        assert torch.equal(out, whole), name
    assert not METHODS["nuslerp"].chunked and not METHODS["arcee_fusion"].chunked


# --- tiny odd-shaped Llamas ----------------------------------------------------------------

GRID = 4096.0  # values on a 2^-12 grid: sums and differences of them are exact


def _config(vocab: int):
    return tiny_llama_config(
        hidden=24, intermediate=40, layers=3, vocab=vocab, heads=4, positions=32
    )


def _states(vocab: int) -> dict[str, dict[str, torch.Tensor]]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ref = LlamaForCausalLM(_config(vocab)).state_dict()
    g = torch.Generator().manual_seed(0)

    def grid(t: torch.Tensor) -> torch.Tensor:
        return (t * GRID).round() / GRID

    base = {k: grid(v + 0.05 * torch.randn(v.shape, generator=g)) for k, v in ref.items()}
    out = {"BASE": base}
    for i in range(3):
        out[f"FT{i}"] = {
            k: grid(v + 0.02 * torch.randn(v.shape, generator=g)) for k, v in base.items()
        }
    ft0 = out["FT0"]
    out["FT0COPY"] = {k: v.clone() for k, v in ft0.items()}
    out["ANTI"] = {k: 2 * base[k] - v for k, v in ft0.items()}  # task vector -tau_0, exactly
    out["BASECOPY"] = {k: v.clone() for k, v in base.items()}
    out["BASECOPY2"] = {k: v.clone() for k, v in base.items()}
    out["NEG"] = {k: -v for k, v in ft0.items()}
    out["ZERO"] = {k: torch.zeros_like(v) for k, v in ft0.items()}
    return out


def _save(root: Path, states: dict, vocab: int) -> dict[str, str]:
    from transformers import LlamaForCausalLM

    paths = {}
    for name, sd in states.items():
        model = LlamaForCausalLM(_config(vocab))
        model.load_state_dict(sd)
        model.save_pretrained(root / name.lower())
        paths[name] = str(root / name.lower())
    return paths


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    states = _states(61)
    return states, _save(tmp_path_factory.mktemp("odd"), states, 61)


def _yaml(text: str, paths: dict[str, str], tmp_path: Path) -> Path:
    for key in sorted(paths, key=len, reverse=True):  # FT0COPY before FT0
        text = text.replace(key, paths[key])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text + "dtype: float32\n")
    return cfg


def _models(*entries: str) -> str:
    return "models:\n" + "".join(f"  - {e}\n" for e in entries)


def _nuslerp(mode: str, base: bool, a: str, b: str, wa="0.3", wb="[0.9, 0.2]") -> str:
    flags = {
        "flat": "{}",
        "dim0": "{nuslerp_flatten: false, nuslerp_row_wise: true}",
        "dim1": "{nuslerp_flatten: false}",
    }[mode]
    head = "merge_method: nuslerp\n" + ("base_model: BASE\n" if base else "")
    listed = ["{model: BASE}"] if base else []  # mergekit lists the base among the models
    models = _models(
        *listed,
        f"{{model: {a}, parameters: {{weight: {wa}}}}}",
        f"{{model: {b}, parameters: {{weight: {wb}}}}}",
    )
    return head + models + f"parameters: {flags}\n"


CONFIGS = {
    **{
        f"nuslerp-{mode}{'-base' if base else ''}": _nuslerp(mode, base, "FT0", "FT1")
        for mode in ("flat", "dim0", "dim1")
        for base in (False, True)
    },
    "multislerp": "merge_method: multislerp\n"
    + _models(
        "{model: FT0, parameters: {weight: 0.5}}",
        "{model: FT1, parameters: {weight: 0.3}}",
        "{model: FT2, parameters: {weight: [0.2, 0.6]}}",
    ),
    "multislerp-base": "merge_method: multislerp\nbase_model: BASE\n"
    + _models(
        "{model: FT0, parameters: {weight: 0.4}}",
        "{model: FT1, parameters: {weight: [{filter: mlp, value: 0.1}, {value: 0.3}]}}",
        "{model: FT2, parameters: {weight: 0.5}}",
    )
    + "parameters: {normalize_weights: false}\n",
    "karcher": "merge_method: karcher\n" + _models("{model: FT0}", "{model: FT1}", "{model: FT2}"),
    "karcher-params": "merge_method: karcher\n"
    + _models("{model: FT0}", "{model: FT1}", "{model: FT2}")
    + "parameters: {max_iter: 2, tol: 1.0e-7}\n",
    # mergekit merges an unlisted base_model as one more input of the methods without a base
    "karcher-base_model": "merge_method: karcher\nbase_model: BASE\n"
    + _models("{model: FT1}", "{model: FT2}"),
    "linear-base_model": "merge_method: linear\nbase_model: BASE\n"
    + _models("{model: FT1}", "{model: FT2}")
    + "parameters: {weight: 0.5}\n",
    "nearswap": "merge_method: nearswap\nbase_model: BASE\n"
    + _models("{model: BASE}", "{model: FT0}")
    + "parameters: {t: [0.005, 0.03]}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: BASE\n"
    + _models("{model: BASE}", "{model: FT1}"),
}
# identical models, zero task vectors, exactly antiparallel task vectors (or models)
DEGENERATE = {
    "nuslerp-identical": _nuslerp("flat", False, "FT0", "FT0COPY"),
    "nuslerp-identical-base": _nuslerp("dim1", True, "FT0", "FT0COPY"),
    "nuslerp-antiparallel-flat": _nuslerp("flat", True, "FT0", "ANTI", wb="0.7"),
    "nuslerp-antiparallel-dim1": _nuslerp("dim1", True, "FT0", "ANTI", wb="0.7"),
    "nuslerp-antiparallel-dim0": _nuslerp("dim0", True, "ANTI", "FT0", wb="1.0"),
    "nuslerp-zero-flat": _nuslerp("flat", True, "BASECOPY", "FT0"),
    "nuslerp-zero-dim0": _nuslerp("dim0", True, "BASECOPY", "BASECOPY2"),
    "multislerp-identical": "merge_method: multislerp\nbase_model: BASE\n"
    + _models(
        "{model: FT0, parameters: {weight: 1.0}}",
        "{model: FT0COPY, parameters: {weight: 1.0}}",
        "{model: FT1, parameters: {weight: 1.0}}",
    ),
    "multislerp-antiparallel": "merge_method: multislerp\nbase_model: BASE\n"
    + _models(
        "{model: FT0, parameters: {weight: 1.0}}", "{model: ANTI, parameters: {weight: 1.0}}"
    ),
    "multislerp-antiparallel-unequal": "merge_method: multislerp\nbase_model: BASE\n"
    + _models(
        "{model: FT0, parameters: {weight: 0.3}}", "{model: ANTI, parameters: {weight: 0.7}}"
    ),
    "multislerp-zero": "merge_method: multislerp\nbase_model: BASE\n"
    + _models(
        "{model: BASECOPY, parameters: {weight: 1.0}}",
        "{model: BASECOPY2, parameters: {weight: 1.0}}",
    ),
    "karcher-identical": "merge_method: karcher\n" + _models("{model: FT0}", "{model: FT0COPY}"),
    "karcher-zero": "merge_method: karcher\n" + _models("{model: ZERO}", "{model: FT0}"),
    "nearswap-identical": "merge_method: nearswap\nbase_model: BASE\n"
    + _models("{model: BASECOPY}")
    + "parameters: {t: 0.01}\n",
    "arcee_fusion-identical": "merge_method: arcee_fusion\nbase_model: BASE\n"
    + _models("{model: BASECOPY}"),
}


def _compare(name: str, text: str, paths: dict[str, str], tmp_path: Path) -> dict:
    cfg = _yaml(text, paths, tmp_path)
    run_mergekit(cfg, tmp_path / "mk")
    merge_to_directory(load_merge_config(cfg), tmp_path / "ours")
    theirs, ours = Checkpoint(str(tmp_path / "mk")), Checkpoint(str(tmp_path / "ours"))
    assert set(theirs.names()) == set(ours.names())
    out = {n: ours.tensor(n) for n in ours.names()}
    worst = 0.0
    for n, a in out.items():
        b = theirs.tensor(n)
        assert a.dtype == b.dtype == torch.float32
        assert torch.isfinite(a).all(), (name, n)
        worst = max(worst, float((a - b).abs().max()))
    print(f"{name}: max |ours - mergekit| = {worst:.2e}")
    assert worst <= 1e-5, f"{name}: max |ours - mergekit| = {worst}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_mergekit(name, zoo, tmp_path):
    states, paths = zoo
    out = _compare(name, CONFIGS[name], paths, tmp_path)
    for model in ("BASE", "FT0", "FT1", "FT2"):  # a real merge, not a copy of an input
        moved = max(float((out[n] - states[model][n]).abs().max()) for n in out)
        assert moved > 1e-3, (name, model)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_inputs_match_mergekit(name, zoo, tmp_path):
    _, paths = zoo
    _compare(name, DEGENERATE[name], paths, tmp_path)


@pytest.mark.slow
def test_karcher_of_antipodal_models_is_the_first_where_mergekit_amplifies_rounding(zoo, tmp_path):
    """x and -x: every point of their equator is a Karcher mean. Both tools start from x;
    the step toward -x is (-u - cos(theta) u) theta / sin(theta) with theta about pi,
    exactly 0 on the Gram matrix (ours: the result is x), float32 rounding noise times
    ~1e4 per step in mergekit (its result depends on its dot products' summation order)."""
    states, paths = zoo
    text = "merge_method: karcher\n" + _models("{model: FT0}", "{model: NEG}")
    cfg = _yaml(text, paths, tmp_path)
    run_mergekit(cfg, tmp_path / "mk")
    merge_to_directory(load_merge_config(cfg), tmp_path / "ours")
    theirs, ours = Checkpoint(str(tmp_path / "mk")), Checkpoint(str(tmp_path / "ours"))
    for name in ours.names():
        assert torch.isfinite(theirs.tensor(name)).all()
        assert torch.allclose(ours.tensor(name), states["FT0"][name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_multislerp_of_three_zero_task_vectors_is_the_base_where_mergekit_refuses(zoo):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    states, _ = zoo
    name = "model.layers.1.mlp.up_proj.weight"
    base = states["BASE"][name]
    group = TensorGroup.from_tensors([base.clone() for _ in range(4)], base_index=0)
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        registry.get("multislerp")((group,), parameters={"weight": [1.0, 1.0, 1.0]})
    assert torch.equal(run("multislerp", [base, base, base], base), base)


# --- streaming, configs, CLI, docs ---------------------------------------------------------


def _spec(method: str, paths: dict[str, str]) -> MergeSpec:
    three = [("FT0", 0.5), ("FT1", 0.3), ("FT2", 0.8)]
    models, base, params = {
        "nuslerp": (three[:2], "BASE", {"nuslerp_flatten": False}),
        "multislerp": (three, "BASE", {}),
        "karcher": (three, None, {"max_iter": 5}),
        "nearswap": (three[:1], "BASE", {"t": 0.01}),
        "arcee_fusion": (three[:1], "BASE", {}),
    }[method]
    per_model = METHODS[method].per_model_params
    return MergeSpec(
        method,
        [ModelInput(paths[m], m.lower(), {"weight": w} if per_model else {}) for m, w in models],
        base=paths[base] if base else None,
        params=params,
    )


@pytest.fixture(scope="module")
def wide_zoo(tmp_path_factory):
    """Embeddings and lm_head of more than a chunk: the engine merges them in chunks."""
    vocab = CHUNK // 24 + 50
    states = {k: v for k, v in _states(vocab).items() if k in ("BASE", "FT0", "FT1", "FT2")}
    return states, _save(tmp_path_factory.mktemp("wide"), states, vocab)


@pytest.mark.parametrize("method", NEW)
def test_streaming_equals_the_in_memory_merge_bit_for_bit(method, wide_zoo, tmp_path):
    states, paths = wide_zoo
    assert states["BASE"]["model.embed_tokens.weight"].numel() > CHUNK
    spec = _spec(method, paths)
    mem = merge_in_memory(
        spec,
        [states[m.label.upper()] for m in spec.models],
        states["BASE"] if spec.base else None,
    )
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        merge_to_directory(spec, out, workers=workers)
        ck = Checkpoint(str(out))
        for name in mem:
            assert torch.equal(ck.tensor(name), mem[name]), (method, workers, name)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "merge_method: nearswap\nbase_model: BASE\n" + _models("{model: FT0}"),
            "parameter 't' is required",
        ),
        (
            "merge_method: nuslerp\n" + _models("{model: FT0}", "{model: FT1}", "{model: FT2}"),
            "takes at most 2 model(s)",
        ),
        ("merge_method: nuslerp\n" + _models("{model: FT0}"), "needs at least 2 model(s)"),
        (
            "merge_method: nuslerp\n"
            + _models("{model: FT0}", "{model: FT1}")
            + "parameters: {nuslerp_flatten: maybe}\n",
            "params.nuslerp_flatten: nuslerp_flatten must be true or false",
        ),
        (
            "merge_method: karcher\n" + _models("{model: FT0}") + "parameters: {max_iter: 1.5}\n",
            "params.max_iter: max_iter must be an integer",
        ),
        (
            "merge_method: multislerp\n" + _models("{model: FT0}") + "parameters: {eps: -1}\n",
            "params.eps: eps=-1.0 is below its minimum",
        ),
        (
            "merge_method: arcee_fusion\nbase_model: BASE\n"
            + _models("{model: FT0, parameters: {weight: 0.5}}"),
            "merge method 'arcee_fusion' has no parameter 'weight'",
        ),
        ("merge_method: arcee_fusion\n" + _models("{model: FT0}"), "needs a base model"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(text, message, zoo, tmp_path):
    _, paths = zoo
    cfg = _yaml(text, paths, tmp_path)
    with pytest.raises(MergeConfigError) as e:
        load_merge_config(cfg)
    assert message in str(e.value) and str(cfg) in str(e.value) and "\n" not in str(e.value)


def test_ours_config_takes_an_optional_base_and_refuses_one_for_karcher(zoo, tmp_path):
    _, paths = zoo
    for method, base, ok in [
        ("multislerp", True, True),
        ("multislerp", False, True),
        ("nuslerp", False, True),
        ("karcher", True, False),
    ]:
        cfg = tmp_path / f"{method}-{base}.yaml"
        text = f"method: {method}\n" + (f"base: {paths['BASE']}\n" if base else "")
        cfg.write_text(text + f"models: [{paths['FT0']}, {paths['FT1']}]\n")
        if ok:
            spec = load_merge_config(cfg)
            assert (spec.base is not None) == base
        else:
            with pytest.raises(MergeConfigError, match="does not use a base model"):
                load_merge_config(cfg)


def test_run_config_takes_the_methods_and_refuses_a_search_it_cannot_steer(tmp_path):
    import yaml

    from model_glue.config import ConfigError, load_config

    def config(method: str, strategy: str, params: dict) -> Path:
        path = tmp_path / f"{method}-{strategy}.yaml"
        data = {
            "zoo": [{"name": "a", "path": "a"}, {"name": "b", "path": "b", "base": "a"}],
            "evaluation": {"tasks": ["t"]},
            "filter": {"strategy": strategy},
            "merge": {"method": method, "params": params},
        }
        path.write_text(yaml.safe_dump(data))
        return path

    assert load_config(config("multislerp", "evolutionary", {"eps": 1e-6})).merge.method == (
        "multislerp"
    )
    assert load_config(config("karcher", "none", {"max_iter": 3})).merge.params == {"max_iter": 3}
    for method, strategy, params, message in [
        ("nuslerp", "coefficient", {}, "merge.method: 'nuslerp' cannot be searched"),
        ("karcher", "evolutionary", {}, "it has no per-model weight to set"),
        ("nearswap", "none", {}, "merge.params.t: merge method 'nearswap' requires it"),
        (
            "nuslerp",
            "none",
            {"nuslerp_row_wise": 2},
            "params.nuslerp_row_wise: nuslerp_row_wise must be",
        ),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(config(method, strategy, params))
        assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_multislerp_in_the_search_takes_task_vectors_against_the_cluster_base():
    from transformers import LlamaForCausalLM

    from model_glue.search import TrialSpec, greedy_selective_merge
    from model_glue.search.proxy import ProxyScorer

    states = _states(61)
    members = {k.lower(): states[k] for k in ("FT0", "FT1", "FT2")}
    scorer = ProxyScorer(
        members, LlamaForCausalLM(_config(61)), lambda model: 0.0, base=states["BASE"]
    )
    merged = scorer.merge(TrialSpec({"ft0": 0.2, "ft1": 0.6}, "multislerp"))
    expected = merge_in_memory(
        "multislerp",
        [members["ft0"], members["ft1"]],
        states["BASE"],
        model_params=[{"weight": 0.2}, {"weight": 0.6}],
    )
    assert all(torch.equal(merged[n], expected[n]) for n in expected)
    result = greedy_selective_merge(list(members), None, scorer, method="multislerp")
    assert result.spec.method == "multislerp"


def test_methods_are_listed_by_glue_methods_and_in_the_docs():
    from typer.testing import CliRunner

    from glue.cli import app

    listing = CliRunner().invoke(app, ["methods"])
    assert listing.exit_code == 0, listing.output
    text = " " + " ".join(listing.output.split())  # the console wraps long lines
    doc = (Path(__file__).resolve().parents[1] / "docs" / "merging.md").read_text()
    for name in NEW:
        assert f" {name}: " in text and f"### `{name}`" in doc
    assert "base model optional: with one, task vectors against it" in text
    for name in ("nuslerp", "karcher", "nearswap", "arcee_fusion"):
        assert METHODS[name].search_refusal
        assert f"not searchable: {METHODS[name].search_refusal}" in METHODS[name].help()
    assert METHODS["multislerp"].search_refusal is None


def test_pipeline_clusters_give_an_optional_base_method_their_base():
    from types import SimpleNamespace

    from flows.steps import mergeable
    from model_glue.config import RunConfig
    from tasks.refs import ModelRef

    refs = {n: ModelRef(n, f"/zoo/{n}", f"fp-{n}", f"art-{n}") for n in ("base", "a", "b")}
    zoo = [{"name": "base", "path": "base"}] + [
        {"name": n, "path": n, "base": "base"} for n in ("a", "b")
    ]
    rec = SimpleNamespace(failures=[], say=lambda *args: None)
    for method, base, members in [
        ("multislerp", "base", ["a", "b"]),
        ("karcher", None, ["base", "a", "b"]),
    ]:
        cfg = RunConfig.model_validate(
            {"zoo": zoo, "evaluation": {"tasks": ["t"]}, "merge": {"method": method}}
        )
        (cluster,) = mergeable([list(refs.values())], cfg, rec)
        assert (cluster.base.name if cluster.base else None) == base
        assert [m.name for m in cluster.members] == members
    assert not rec.failures
