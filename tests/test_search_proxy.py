"""ProxyScorer on tiny real Llamas: in-memory merges against hand computation, the reused
model object, per-layer-group merges, the similarity order, and CMA-ES improving a real
merge whose fitness is a real forward pass."""

from __future__ import annotations

import pytest
import torch

from model_glue.env import configure_environment

configure_environment()

from transformers import LlamaForCausalLM  # noqa: E402

from model_glue.checkpoint import CheckpointError  # noqa: E402
from model_glue.search import TrialSpec, evolutionary_search, greedy_selective_merge  # noqa: E402
from model_glue.search.proxy import ProxyScorer, load_state_dict  # noqa: E402
from tests.factories import tiny_llama_config  # noqa: E402

CONFIG = tiny_llama_config(positions=16)


def tiny_states() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    base = LlamaForCausalLM(CONFIG).state_dict()
    states = {"base": {k: v.clone() for k, v in base.items()}}
    for i, name in enumerate(["a", "b", "far"]):
        g = torch.Generator().manual_seed(10 + i)
        scale = 0.3 if name != "far" else 3.0
        states[name] = {
            k: v + scale * torch.randn(v.shape, generator=g) * v.std().clamp_min(0.02)
            for k, v in base.items()
        }
    return states


@pytest.fixture(scope="module")
def states():
    return tiny_states()


def make_scorer(states, proxy=lambda model: 0.0):
    return ProxyScorer(
        {k: v for k, v in states.items() if k != "base"}, LlamaForCausalLM(CONFIG), proxy
    )


def test_linear_merge_matches_hand_computation_and_lands_in_the_reused_model(states):
    scorer = make_scorer(states)
    model = scorer.model
    name = "model.layers.1.mlp.up_proj.weight"
    spec = TrialSpec({"a": 0.2, "b": 0.6})
    scorer(spec)
    expected = (0.2 * states["a"][name] + 0.6 * states["b"][name]) / 0.8
    assert torch.allclose(model.state_dict()[name], expected, atol=1e-6)
    assert scorer.model is model and len(scorer.costs) == 1
    scorer(TrialSpec({"far": 1.0}))
    assert torch.equal(model.state_dict()[name], states["far"][name])


def test_per_layer_group_weights_apply_to_their_tensors(states):
    scorer = make_scorer(states)
    # G = 2 groups of one layer each, then embeddings/norm/lm_head.
    merged = scorer.merge(TrialSpec({"a": (1.0, 0.0, 0.5), "b": (0.0, 1.0, 0.5)}))
    layer0, layer1 = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    )
    assert torch.equal(merged[layer0], states["a"][layer0])
    assert torch.equal(merged[layer1], states["b"][layer1])
    emb = "model.embed_tokens.weight"
    assert torch.allclose(merged[emb], (states["a"][emb] + states["b"][emb]) / 2)


def test_similarity_of_current_merge_orders_near_models_first(states):
    scorer = make_scorer(states)
    assert scorer.similarity({"a": 1.0}, "a") == pytest.approx(1.0)
    assert scorer.similarity({"a": 1.0}, "b") > scorer.similarity({"a": 1.0}, "far")
    result = greedy_selective_merge(
        ["a", "b", "far"],
        {"a": 0.5, "b": 0.4, "far": 0.45},
        lambda s: 0.6 if "far" not in s.weights else 0.1,
        strategy="similarity",
        similarity=scorer.similarity,
        grid=(0.5,),
    )
    # far has the higher single score but b is more similar to a, so b is tried first.
    assert [t.spec.models for t in result.trials] == [["a", "b"], ["a", "b", "far"]]
    assert result.rejected.keys() == {"far"}


def test_layout_errors_name_the_model_and_tensor(states):
    broken = {k: dict(v) for k, v in states.items() if k != "base"}
    broken["b"]["model.norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"'b'.*model.norm.weight"):
        ProxyScorer(broken, LlamaForCausalLM(CONFIG), lambda m: 0.0)
    with pytest.raises(KeyError, match="'zzz'"):
        make_scorer(states)(TrialSpec({"zzz": 1.0}))


def test_cma_es_improves_a_real_merge_within_a_small_budget(states):
    """Fitness: how close the merged model's logits are to a hidden target merge 0.8 a + 0.2 b."""
    target = LlamaForCausalLM(CONFIG)
    target.load_state_dict({k: 0.8 * states["a"][k] + 0.2 * states["b"][k] for k in states["a"]})
    tokens = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wanted = target(tokens).logits

    def proxy(model) -> float:
        with torch.no_grad():
            return -float(((model(tokens).logits - wanted) ** 2).mean())

    scorer = make_scorer(states, proxy)
    result = evolutionary_search(["a", "b", "far"], scorer, budget=30, seed=42)
    start = result.trials[0].proxy_score
    assert (
        result.best_score > start and result.best_score > 0.5 * start
    )  # at least halves the error
    assert len(scorer.costs) == result.evaluations == 30
    share = {n: w / sum(result.weights.values()) for n, w in result.weights.items()}
    assert share["far"] < 1 / 3  # the uniform start gave it a third


def test_load_state_dict_reads_saved_checkpoint(tmp_path, states):
    model = LlamaForCausalLM(CONFIG)
    model.save_pretrained(tmp_path / "m")
    loaded = load_state_dict(tmp_path / "m")
    assert loaded.keys() == model.state_dict().keys()
    assert all(t.dtype == torch.float32 for t in loaded.values())


def test_task_vector_methods_get_the_base_and_per_model_densities(states):
    from model_glue.merge.memory import merge_in_memory

    models = {k: v for k, v in states.items() if k != "base"}
    scorer = ProxyScorer(
        models,
        LlamaForCausalLM(CONFIG),
        lambda m: 0.0,
        base=states["base"],
        method_params={"ties": {"density": 0.9}},
    )
    spec = TrialSpec({"a": 0.7, "b": 0.4}, "ties", {"a": 0.3, "b": 0.6})
    expected = merge_in_memory(
        "ties",
        [models["a"], models["b"]],
        states["base"],
        model_params=[{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.6}],
        names=["a", "b"],
    )
    merged = scorer.merge(spec)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    # Without trial densities the method's fixed density applies.
    fixed = scorer.merge(TrialSpec({"a": 0.7, "b": 0.4}, "ties"))
    expected = merge_in_memory(
        "ties",
        [models["a"], models["b"]],
        states["base"],
        params={"density": 0.9},
        model_params=[{"weight": 0.7}, {"weight": 0.4}],
        names=["a", "b"],
    )
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(fixed[name], merged[name])
    assert torch.equal(fixed[name], expected[name])
    with pytest.raises(ValueError, match="needs a base"):
        make_scorer(states)(TrialSpec({"a": 1.0, "b": 1.0}, "task_arithmetic"))
