"""CMA-ES search on synthetic proxy scores: improves on its start within a small budget,
respects the budget and bounds, is deterministic from its seed, and lays out per-group
weights and densities as documented."""

from __future__ import annotations

import numpy as np
import pytest

from model_glue.search import TrialSpec, evolutionary_search, layer_group_of

NAMES = ["a", "b", "c", "noisy"]
TARGET = {"a": 0.5, "b": 0.3, "c": 0.2, "noisy": 0.0}


def shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values()) or 1.0
    return {n: w / total for n, w in weights.items()}


def distance_score(spec: TrialSpec) -> float:
    s = shares(dict(spec.weights))
    return 1.0 - sum((s[n] - TARGET[n]) ** 2 for n in NAMES)


def test_improves_on_the_uniform_start_within_a_small_budget():
    result = evolutionary_search(NAMES, distance_score, budget=40)

    start = result.trials[0]
    assert start.spec.weights == {n: 0.5 for n in NAMES} and start.accepted
    assert start.proxy_score == pytest.approx(1.0 - (0.25**2 + 0.05**2 + 0.05**2 + 0.25**2))
    assert result.best_score > start.proxy_score + 0.05
    assert result.evaluations == 40
    assert result.best_score == max(t.proxy_score for t in result.trials)
    assert "noisy" in result.rejected or shares(result.weights)["noisy"] < 0.15
    assert all(0.0 <= w <= 1.0 for t in result.trials for w in t.spec.weights.values())
    # accepted marks each new best so far, so the scores of accepted trials increase.
    accepted_scores = [t.proxy_score for t in result.trials if t.accepted]
    assert accepted_scores == sorted(accepted_scores) and accepted_scores[-1] == result.best_score


def test_deterministic_from_seed_and_leaves_global_numpy_state_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = evolutionary_search(NAMES, distance_score, budget=20, seed=7)
    assert (np.random.get_state()[1] == before).all()
    np.random.seed(999)  # a different global state must not change the search
    b = evolutionary_search(NAMES, distance_score, budget=20, seed=7)
    c = evolutionary_search(NAMES, distance_score, budget=20, seed=8)
    assert [t.spec for t in a.trials] == [t.spec for t in b.trials]
    assert [t.spec for t in a.trials] != [t.spec for t in c.trials]


def test_budget_is_a_hard_cap_even_mid_generation():
    # d = 4 -> popsize 4 + floor(3 ln 4) = 8; 1 start + 8 + 8 = 17 > 13.
    result = evolutionary_search(NAMES, distance_score, budget=13)
    assert result.evaluations == 13
    result = evolutionary_search(NAMES, distance_score, budget=13, popsize=4)
    assert result.evaluations == 13


def test_per_layer_group_weights_and_densities_layout():
    def score(spec: TrialSpec) -> float:
        # Group 0 wants model a, group 1 wants model b, the rest is indifferent;
        # densities want 0.3.
        w = spec.weights
        g0 = shares({n: w[n][0] for n in w})
        g1 = shares({n: w[n][1] for n in w})
        dens = sum((d - 0.3) ** 2 for d in spec.densities.values())
        return 2.0 - (1 - g0["a"]) ** 2 - (1 - g1["b"]) ** 2 - dens

    result = evolutionary_search(
        ["a", "b"], score, method="ties", layer_groups=2, search_density=True, budget=60, seed=42
    )
    start = result.trials[0].spec
    assert start.layer_groups == 2 and start.weights["a"] == (0.5, 0.5, 0.5)
    assert start.densities == {"a": 0.5, "b": 0.5}
    assert result.best_score > result.trials[0].proxy_score + 0.1
    assert all(0.1 <= d <= 1.0 for t in result.trials for d in t.spec.densities.values())
    record = result.trials[0].record()
    assert record["coefficients"] == {
        "weights": {"a": [0.5] * 3, "b": [0.5] * 3},
        "densities": {"a": 0.5, "b": 0.5},
    }


def test_single_model_needs_no_search():
    result = evolutionary_search(["a"], lambda s: 0.4, budget=50)
    assert result.evaluations == 1 and result.accepted == ["a"] and result.best_score == 0.4


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="search_density"):
        evolutionary_search(NAMES, distance_score, method="linear", search_density=True)
    with pytest.raises(ValueError, match="budget"):
        evolutionary_search(NAMES, distance_score, budget=0)
    with pytest.raises(ValueError, match="distinct"):
        evolutionary_search(["a", "a"], distance_score)


def _layout(arch: str, prefix: str, layers: int = 4):
    from model_glue.architectures import resolve_layout

    if arch == "GPT2LMHeadModel":
        per = {
            "attn.c_attn": (8, 24),
            "attn.c_proj": (8, 8),
            "mlp.c_fc": (8, 32),
            "mlp.c_proj": (32, 8),
        }
        outside = {"transformer.wte.weight": (16, 8)}
    else:
        per = {f"self_attn.{p}_proj": (8, 8) for p in "qkvo"}
        per |= {"mlp.gate_proj": (16, 8), "mlp.up_proj": (16, 8), "mlp.down_proj": (8, 16)}
        outside = {"model.embed_tokens.weight": (16, 8), "lm_head.weight": (16, 8)}
    shapes = {f"{prefix}.{i}.{p}.weight": s for i in range(layers) for p, s in per.items()}
    return resolve_layout({"architectures": [arch]}, {**shapes, **outside})


def test_layer_groups_are_contiguous_and_other_tensors_go_last():
    for layout in (
        _layout("LlamaForCausalLM", "model.layers"),
        _layout("GPT2LMHeadModel", "transformer.h"),
    ):
        layers = sorted({layout.layer_of(n) for n in layout.projections})
        assert layers == [0, 1, 2, 3]
        assert [layer_group_of(i, 4, 2) for i in layers] == [0, 0, 1, 1]
        assert [layer_group_of(i, 4, 3) for i in layers] == [0, 0, 1, 2]
        for outside in layout.embeddings:
            assert layer_group_of(layout.layer_of(outside), 4, 2) == 2
    with pytest.raises(ValueError, match="between 1 and the 4 layers"):
        layer_group_of(0, 4, 5)


def test_engine_params_translate_groups_into_layer_filters():
    from model_glue.search import engine_model_params

    spec = TrialSpec({"a": (0.1, 0.2, 0.3), "b": (1.0, 0.0, 0.5)}, "ties", {"a": 0.4, "b": 0.9})
    params = engine_model_params(spec, _layout("LlamaForCausalLM", "model.layers"))
    assert params["a"] == {
        "weight": [
            {"filter": "model.layers.0.", "value": 0.1},
            {"filter": "model.layers.1.", "value": 0.1},
            {"filter": "model.layers.2.", "value": 0.2},
            {"filter": "model.layers.3.", "value": 0.2},
            {"value": 0.3},
        ],
        "density": 0.4,
    }
    # GPT-2's layers are transformer.h.N: the filters follow its layout
    gpt2 = engine_model_params(spec, _layout("GPT2LMHeadModel", "transformer.h"))
    assert [e.get("filter") for e in gpt2["b"]["weight"]] == [
        "transformer.h.0.", "transformer.h.1.", "transformer.h.2.", "transformer.h.3.", None
    ]  # fmt: skip
    layout = _layout("LlamaForCausalLM", "model.layers")
    assert engine_model_params(TrialSpec({"a": 0.7}), layout) == {"a": {"weight": 0.7}}
