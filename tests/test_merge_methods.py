"""Every merge method against a hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from model_glue.merge import METHODS, MergeConfigError, Merger, merge_in_memory
from model_glue.merge.methods._common import sign_consensus_merge
from model_glue.merge.params import Param, depth_position, resolve
from model_glue.merge.registry import CHUNK, merge_method
from model_glue.merge.sparsify import (
    RandomKeep,
    breadcrumbs_prune_,
    drop_,
    kth_largest,
    magnitude_prune_,
    random_drop_,
    top_k_mask,
)

T = torch.tensor


def run(method, models, base=None, params=None, model_params=None, names=None):
    sds = [{"w": m.clone()} for m in models]
    b = {"w": base.clone()} if base is not None else None
    return merge_in_memory(method, sds, b, params=params, model_params=model_params, names=names)[
        "w"
    ]


def test_linear_normalized_weighted_average():
    out = run(
        "linear", [T([1.0, 2.0]), T([3.0, 6.0])], model_params=[{"weight": 1.0}, {"weight": 3.0}]
    )
    assert torch.allclose(out, T([(1 + 9) / 4, (2 + 18) / 4]))


def test_linear_without_normalize_is_weighted_sum_and_zero_sum_weights_fail():
    out = run("linear", [T([1.0]), T([3.0])], params={"normalize": False, "weight": 0.5})
    assert torch.allclose(out, T([2.0]))
    with pytest.raises(ValueError, match="sum to 0"):
        run("linear", [T([1.0]), T([3.0])], model_params=[{"weight": 1.0}, {"weight": -1.0}])


def test_task_arithmetic_lambda_and_weights():
    base, a, b = T([1.0, 1.0]), T([2.0, 0.0]), T([1.5, 3.0])
    out = run(
        "task_arithmetic",
        [a, b],
        base,
        params={"lambda": 0.5},
        model_params=[{"weight": 1.0}, {"weight": 2.0}],
    )
    # tau_a = [1, -1], tau_b = [0.5, 2]; sum w tau = [2, 3]; base + 0.5 * [2, 3]
    assert torch.allclose(out, T([2.0, 2.5]))
    out = run(
        "task_arithmetic",
        [a, b],
        base,
        params={"normalize": True},
        model_params=[{"weight": 1.0}, {"weight": 3.0}],
    )
    # (1*[1,-1] + 3*[0.5,2]) / 4 = [0.625, 1.25]
    assert torch.allclose(out, T([1.625, 2.25]))


def test_ties_trim_elect_disjoint_mean():
    base = torch.zeros(4)
    a = T([3.0, -1.0, 0.5, 2.0])
    b = T([-1.0, -2.0, 4.0, 0.1])
    # density 0.5 keeps 2 of 4: a -> [3, 0, 0, 2], b -> [0, -2, 4, 0]
    # elected sign: sum = [3, -2, 4, 2] -> all agree with the single survivor
    out = run("ties", [a, b], base, params={"density": 0.5})
    assert torch.allclose(out, T([3.0, -2.0, 4.0, 2.0]))
    # density 1: a, b as is; signs [+, -, +, +]; entry 0: only a agrees; entry 1: both (-1,-2) -> -1.5
    out = run("ties", [a, b], base, params={"density": 1.0})
    assert torch.allclose(out, T([3.0, -1.5, (0.5 + 4.0) / 2, (2.0 + 0.1) / 2]))


def test_ties_weights_enter_election_and_divisor():
    base = torch.zeros(1)
    out = run(
        "ties",
        [T([1.0]), T([-0.8])],
        base,
        params={"density": 1.0},
        model_params=[{"weight": 0.5}, {"weight": 1.0}],
    )
    # weighted: 0.5 and -0.8 -> sum -0.3 -> minus wins; kept -0.8 / weight 1.0
    assert torch.allclose(out, T([-0.8]))
    out = run("ties", [T([1.0]), T([-1.0])], base, params={"density": 1.0})
    assert torch.allclose(out, T([1.0]))  # sum 0 elects + (mergekit's rule)
    out = run(
        "ties",
        [T([1.0]), T([3.0])],
        base,
        params={"density": 1.0, "normalize": False, "lambda": 0.5},
    )
    assert torch.allclose(out, T([2.0]))


def test_magnitude_prune_keeps_exactly_k_with_index_tie_break():
    x = T([1.0, -2.0, 2.0, 2.0, 0.5])
    magnitude_prune_(x, 0.4)  # k = 2 of the three |2|: the first two by index
    assert x.tolist() == [0.0, -2.0, 2.0, 0.0, 0.0]
    y = T([1.0, 2.0, 3.0])
    magnitude_prune_(y, 0.1)  # at least one element is kept
    assert y.tolist() == [0.0, 0.0, 3.0]


def test_kth_largest_bracketed_path_is_exact_on_large_tensors():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3_000_000, generator=g).abs()
    x[::7] = 0.25  # many ties
    ref = x.sort(descending=True).values
    for k in (1, 10, 1_000_000, 1_500_000, 2_999_999):
        value, greater, equal = kth_largest(x, k)
        assert value == float(ref[k - 1])
        assert greater == int((x > value).sum()) and equal == int((x == value).sum())
    mask = top_k_mask(x, 1_234_567)
    assert int(mask.sum()) == 1_234_567
    assert float(x[mask].min()) >= float(x[~mask].max())
    for k in (1_000_000, 2_000_000):  # the tie value 0.25 sits near rank 1.0M..2.0M
        tau = x.clone() * torch.where(torch.arange(x.numel()) % 2 == 0, 1.0, -1.0)
        magnitude_prune_(tau, k / x.numel())
        kept = tau != 0
        assert int(kept.sum()) == k
        assert torch.equal(kept, top_k_mask(x, k))


def test_breadcrumbs_drops_outliers_and_small_entries():
    tau = torch.arange(1.0, 11.0)  # magnitudes 1..10
    breadcrumbs_prune_(tau, 0.5, 0.2)  # keep 5; n_top=2, n_bot=3 -> ranks 3..7 kept: values 4..8
    assert tau.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]
    tau = torch.arange(1.0, 11.0)
    breadcrumbs_prune_(tau, 0.9, 0.2)  # n_bot = max(0, 10-9-2) = 0: outlier cut shrinks to 1
    assert tau.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_breadcrumbs_merge_is_task_arithmetic_of_masked_vectors():
    base = torch.zeros(10)
    a = torch.arange(1.0, 11.0)
    b = -torch.arange(1.0, 11.0).flip(0)
    out = run("breadcrumbs", [a, b], base, params={"density": 0.5, "gamma": 0.2})
    ma = T([0, 0, 0, 4, 5, 6, 7, 8, 0, 0.0])
    mb = -T([0, 0, 8, 7, 6, 5, 4, 0, 0, 0.0])
    assert torch.allclose(out, ma + mb)


def test_dare_linear_rescales_by_inverse_effective_density():
    base = torch.zeros(10_000)
    a = torch.ones(10_000)
    out = run("dare_linear", [a], base, params={"density": 0.25}, names=["a"])
    kept = out != 0
    assert torch.allclose(out[kept], torch.full((int(kept.sum()),), 4.0))
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    out_l1 = run("dare_linear", [a], base, params={"density": 0.25, "rescale": "l1"}, names=["a"])
    assert torch.equal(out_l1 != 0, kept)  # same mask (same seed, tensor, model)
    assert math.isclose(out_l1.sum().item(), 10_000, rel_tol=1e-5)  # L1 norm restored


def test_dare_masks_are_seeded_per_tensor_and_model():
    base = torch.zeros(1000)
    a, b = torch.ones(1000), torch.ones(1000)
    one = run(
        "dare_linear", [a, b], base, params={"density": 0.5, "rescale": "none"}, names=["x", "y"]
    )
    again = run(
        "dare_linear", [a, b], base, params={"density": 0.5, "rescale": "none"}, names=["x", "y"]
    )
    swapped = run(
        "dare_linear", [b, a], base, params={"density": 0.5, "rescale": "none"}, names=["y", "x"]
    )
    other = run(
        "dare_linear",
        [a, b],
        base,
        params={"density": 0.5, "rescale": "none", "seed": 1},
        names=["x", "y"],
    )
    assert torch.equal(one, again) and torch.equal(one, swapped)
    assert not torch.equal(one, other)
    # The two models get different masks: some entries have one survivor, some two.
    assert set(one.unique().tolist()) == {0.0, 1.0, 2.0}


def test_random_drop_prefix_independent_of_length():
    a, b = torch.ones(100), torch.ones(1000)
    random_drop_(a, 0.5, 42)
    random_drop_(b, 0.5, 42)
    assert torch.equal(a, b[:100])  # draw i belongs to element i


def test_random_drop_in_chunks_equals_whole_with_the_same_l1_sums():
    n = 2 * CHUNK + 1001
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    whole = x.clone()
    d = random_drop_(whole, 0.3, 99, measure_l1=True)
    assert d.p == round(0.3 * 65536) / 65536
    assert d.l1_before == pytest.approx(float(x.abs().double().sum()), rel=1e-6)
    assert d.l1_after == pytest.approx(float(whole.abs().double().sum()), rel=1e-6)
    # In order, sharing one RandomKeep (the engine's chunked path) ...
    parts, keep, before, after = x.clone(), RandomKeep(0.3, 99), [], []
    for a in range(0, n, CHUNK):
        c = drop_(parts[a : a + CHUNK], keep, offset=a, measure_l1=True)
        before.append(c.l1_before)
        after.append(c.l1_after)
    assert torch.equal(parts, whole)
    # ... the exact sums of the chunks' sums are the whole tensor's, bit for bit.
    assert (math.fsum(before), math.fsum(after)) == (d.l1_before, d.l1_after)
    # Out of order and at offsets off the chunk grid: the stream is advanced.
    late = x[CHUNK + 8 :].clone()
    random_drop_(late, 0.3, 99, offset=CHUNK + 8)
    assert torch.equal(late, whole[CHUNK + 8 :])
    with pytest.raises(ValueError, match="multiple of 4"):
        random_drop_(x[2:].clone(), 0.3, 99, offset=2)


def _masked_consensus(base, taus, weights, lam, normalize, scales):
    """Sign election and disjoint mean written the obvious way, with masks."""
    t = torch.stack([w * s * tau for w, s, tau in zip(weights, scales, taus, strict=True)])
    elected = torch.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(t) == elected) & (t != 0)
    kept = (t * agree).sum(0)
    if normalize:
        divisor = (torch.tensor(weights)[:, None] * agree).sum(0)
        kept = torch.nan_to_num(kept / divisor, nan=0.0, posinf=math.inf, neginf=-math.inf)
    return base + lam * kept


@pytest.mark.parametrize(
    ("weights", "scales", "normalize", "lam"),
    [
        ((0.7, 0.3), (1.0, 1.0), True, 1.0),
        ((0.5, 1.5, 1.0), (2.0, 0.5, 1.0), True, 0.8),
        ((0.7, -0.4, 0.0, 1.3), (1.0, 2.0, 1.0, 0.5), False, 1.2),
        ((-1.0, 0.5), (1.0, 1.0), False, 1.0),
        ((0.0, 0.0), (1.0, 1.0), False, 1.0),
    ],
)
def test_sign_consensus_matches_the_masked_formula(weights, scales, normalize, lam):
    g = torch.Generator().manual_seed(len(weights))
    n = CHUNK + 5000  # more than one chunk
    base = torch.randn(n, generator=g)
    taus = [torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.6) for _ in weights]
    expected = _masked_consensus(base, taus, weights, lam, normalize, scales)
    out = sign_consensus_merge(
        base.clone(), [t.clone() for t in taus], weights, lam, normalize, scales
    )
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_reduce_is_only_for_chunked_methods():
    with pytest.raises(ValueError, match="reduce is only used by chunked methods"):
        merge_method(
            "not-registered", params=(), base="none", summary="x", reference="x", reduce=len
        )


def test_dare_ties_combines_with_sign_election():
    base = torch.zeros(2000)
    a, b = torch.ones(2000), -0.5 * torch.ones(2000)
    out = run(
        "dare_ties", [a, b], base, params={"density": 0.5, "rescale": "none"}, names=["a", "b"]
    )
    ka = (
        run(
            "dare_linear",
            [a, torch.zeros(2000)],
            base,
            params={"density": 0.5, "rescale": "none"},
            names=["a", "b"],
        )
        != 0
    )
    kb = (
        run(
            "dare_linear",
            [torch.zeros(2000), b],
            base,
            params={"density": 0.5, "rescale": "none"},
            names=["a", "b"],
        )
        != 0
    )
    expect = torch.where(ka, 1.0, torch.where(kb, -0.5, 0.0))  # a wins where it survives
    assert torch.equal(out, expect)


def test_slerp_matches_formula_and_falls_back_to_linear():
    v0, v1 = T([1.0, 0.0]), T([0.0, 2.0])
    out = run("slerp", [v1], v0, params={"t": 0.5})
    theta = math.pi / 2
    c = math.sin(0.5 * theta) / math.sin(theta)
    assert torch.allclose(out, T([c, 2 * c]))
    par = run("slerp", [T([2.0, 4.0])], T([1.0, 2.0]), params={"t": 0.25})
    assert torch.allclose(par, T([1.25, 2.5]))  # parallel: linear
    assert torch.allclose(run("slerp", [v1], v0, params={"t": 0.0}), v0)


def test_model_stock_formula():
    base = torch.zeros(2)
    a, b = T([1.0, 0.0]), T([1.0, 1.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    out = run("model_stock", [a, b], base)
    assert torch.allclose(out, t * T([1.0, 0.5]))
    orth = run(
        "model_stock", [T([1.0, 0.0]), T([-1.0, 0.0])], base
    )  # cos -1: 1 + (2-1)(-1) = 0 -> base
    assert torch.equal(orth, base)


def test_gradient_and_filter_settings_resolve_per_tensor():
    p = Param("density", float, per_model=True)
    assert depth_position(3, 5) == 0.75 and depth_position(None, 5) == 0.0
    assert resolve(p, ([0.0, 1.0],), "model.layers.3.mlp.up_proj.weight", 0.75, "x") == 0.75
    assert resolve(p, ([0.2, 0.4, 1.0],), "a", 0.75, "x") == pytest.approx(0.7)
    setting = [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "mlp", "value": [0.2, 0.6]},
        {"value": 0.9},
    ]
    assert resolve(p, (setting,), "model.layers.1.self_attn.q_proj.weight", 0.5, "x") == 0.1
    assert resolve(p, (setting,), "model.layers.1.mlp.up_proj.weight", 0.5, "x") == pytest.approx(
        0.4
    )
    assert resolve(p, (setting,), "model.norm.weight", 0.0, "x") == 0.9


def test_per_tensor_parameters_reach_the_method():
    sds = [
        {"model.layers.0.mlp.w": T([2.0]), "model.layers.1.self_attn.w": T([2.0])},
        {"model.layers.0.mlp.w": T([4.0]), "model.layers.1.self_attn.w": T([4.0])},
    ]
    out = merge_in_memory("linear", sds, model_params=[{"weight": [1.0, 3.0]}, {"weight": 1.0}])
    assert out["model.layers.0.mlp.w"].item() == pytest.approx(3.0)  # weights 1, 1
    assert out["model.layers.1.self_attn.w"].item() == pytest.approx(2.5)  # weights 3, 1


def test_merger_reuses_inputs_with_new_coefficients():
    sds = [{"w": T([1.0, 2.0])}, {"w": T([3.0, 4.0])}]
    m = Merger("linear", sds)
    assert torch.allclose(m()["w"], T([2.0, 3.0]))
    assert torch.allclose(m(model_params=[{"weight": 3.0}, {"weight": 1.0}])["w"], T([1.5, 2.5]))
    assert torch.allclose(m()["w"], T([2.0, 3.0]))  # inputs untouched by earlier calls
    assert sds[0]["w"].tolist() == [1.0, 2.0]


def test_bad_parameters_are_named():
    with pytest.raises(MergeConfigError, match="no parameter 'densty'"):
        run("ties", [T([1.0])], T([0.0]), params={"densty": 0.5})
    with pytest.raises(MergeConfigError, match="density=1.5 is above"):
        run("ties", [T([1.0])], T([0.0]), params={"density": 1.5})
    with pytest.raises(MergeConfigError, match="needs a base"):
        run("ties", [T([1.0])], params={"density": 0.5})
    with pytest.raises(MergeConfigError, match="missing required parameter 'density'"):
        run("ties", [T([1.0])], T([0.0]))
    with pytest.raises(MergeConfigError, match="unknown merge method 'tie'"):
        run("tie", [T([1.0])])


def test_every_method_is_declared_with_documented_defaults():
    expected = {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "slerp",
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
    }
    assert expected <= set(METHODS)
    for name in ("ties", "dare_ties", "breadcrumbs_ties"):
        assert METHODS[name].param("normalize").default is True
    for name in ("task_arithmetic", "dare_linear", "breadcrumbs"):
        assert METHODS[name].param("normalize").default is False


def test_docs_method_tables_are_generated_from_the_declarations():
    from pathlib import Path

    from model_glue.merge.registry import methods_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "merging.md").read_text()
    section = doc.split("<!-- methods:begin -->\n", 1)[1].split("<!-- methods:end -->", 1)[0]
    assert section == methods_markdown(), "regenerate docs/merging.md with methods_markdown()"


def _allocating(fn):
    """``fn()`` and the bytes of CPU memory torch allocated while it ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def test_merger_keeps_16_bit_inputs_16_bit_with_the_same_results():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 50, generator=g).bfloat16()}
    models = [
        {"w": (base["w"].float() + 0.01 * torch.randn(300, 50, generator=g)).bfloat16()}
        for _ in range(2)
    ]
    half, allocated = _allocating(
        lambda: Merger("ties", models, base=base, params={"density": 0.5})
    )
    assert allocated < base["w"].numel() * 4  # not even one float32 copy: half the memory
    full = Merger(
        "ties",
        [{"w": m["w"].float()} for m in models],
        base={"w": base["w"].float()},
        params={"density": 0.5},
    )
    out = half()["w"]
    assert out.dtype == torch.bfloat16 and torch.equal(out, full()["w"].bfloat16())
    assert torch.equal(half()["w"], out)  # inputs untouched by a call
