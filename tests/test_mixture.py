"""Mixtures: routers against hand computation, Mixtral layout, save/load round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralForCausalLM

from model_glue.mixture import (
    BlockLevelMixture,
    MixtureError,
    ModelLevelMixture,
    RouterInit,
    build_block_level_mixture,
    build_ffn_moe,
    build_hybrid,
    build_model_level_mixture,
    fit_linear_router,
    load_mixture,
    router_accuracy,
)
from model_glue.mixture.accuracy import ExpertCorrectness
from model_glue.mixture.hidden import layer_inputs, pool
from model_glue.mixture.routers import init_gates
from tests.factories import PROMPTS, char_llama, char_tokenizer, save_experts, save_with_tokenizer


@pytest.fixture
def zoo(tmp_path) -> dict[str, Path]:
    """A base and three 'experts' of one architecture, with one tokenizer."""
    return save_experts(tmp_path)


def ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


# --- pooling and hidden states -------------------------------------------------------------


def test_pool_uses_real_tokens_only():
    h = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    assert pool(h, mask, "mean").tolist() == [[1.0, 2.0], [9.0, 10.0]]
    assert pool(h, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert pool(h, mask, "first").tolist() == [[0.0, 1.0], [8.0, 9.0]]


def test_layer_inputs_match_output_hidden_states():
    model, tok = char_llama(0), char_tokenizer()
    texts = ["1+2=", "next abc=", "z"]
    got = layer_inputs(model, tok, texts, [0, 1, 2], pooling="last")
    for i, text in enumerate(texts):
        hs = model(ids(tok, text), output_hidden_states=True).hidden_states
        for layer in range(3):  # hidden_states[l] enters layer l
            torch.testing.assert_close(got[layer, i], hs[layer][0, -1], rtol=1e-5, atol=1e-6)


# --- training-free routers -----------------------------------------------------------------


def test_hidden_router_is_normalised_mean_difference():
    model, tok = char_llama(1), char_tokenizer()
    gates = init_gates(RouterInit("hidden"), model, tok, PROMPTS, ["e1", "e2", "e3"], [0, 2])
    assert gates.shape == (2, 3, 16)

    def last(text, layer):
        return model(ids(tok, text), output_hidden_states=True).hidden_states[layer][0, -1]

    for row, layer in enumerate([0, 2]):
        e1 = (last("1+2=", layer) + last("3+4=", layer)) / 2 - last("last abc", layer)
        e3 = (last("last abc=", layer) + last("last xyz=", layer)) / 2
        torch.testing.assert_close(gates[row, 0], e1 / e1.norm(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gates[row, 2], e3 / e3.norm(), rtol=1e-4, atol=1e-5)


def test_cheap_embed_router_sums_prompt_embeddings():
    model, tok = char_llama(2), char_tokenizer()
    gates = init_gates(
        RouterInit("cheap_embed"), model, tok, PROMPTS, ["e1", "e2", "e3"], [0, 1, 2]
    )
    table = model.get_input_embeddings().weight
    want = table[tok("next a=")["input_ids"]].sum(0) + table[tok("next q=")["input_ids"]].sum(0)
    for layer in range(3):
        torch.testing.assert_close(gates[layer, 1], want / want.norm())


def test_random_router_is_seeded_and_needs_no_prompts():
    model = char_llama(0)
    a = init_gates(RouterInit("random", seed=3), model, None, None, ["x", "y"], [0, 1])
    b = init_gates(RouterInit("random", seed=3), model, None, None, ["x", "y"], [0, 1])
    c = init_gates(RouterInit("random", seed=4), model, None, None, ["x", "y"], [0, 1])
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 2))


def test_router_config_errors_name_the_key():
    model, tok = char_llama(0), char_tokenizer()
    with pytest.raises(MixtureError, match="prompts.e2: missing"):
        init_gates(RouterInit("hidden"), model, tok, {"e1": ["a"]}, ["e1", "e2"], [0])
    with pytest.raises(MixtureError, match="prompts.e1.postive: unknown key"):
        init_gates(
            RouterInit("hidden"),
            model,
            tok,
            {"e1": {"postive": ["a"]}, "e2": ["b"]},
            ["e1", "e2"],
            [0],
        )
    with pytest.raises(MixtureError, match="prompts.zz: not an expert"):
        init_gates(
            RouterInit("hidden"),
            model,
            tok,
            {"e1": ["a"], "e2": ["b"], "zz": ["c"]},
            ["e1", "e2"],
            [0],
        )
    with pytest.raises(MixtureError, match="router.method: unknown 'hiden'"):
        RouterInit("hiden")


# --- FFN-level MoE (Mixtral) ---------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_mixtral_of_identical_experts_equals_dense_model(zoo, tmp_path, top_k):
    out = build_ffn_moe(
        zoo["e1"],
        [zoo["e1"]] * 3,
        tmp_path / "moe",
        top_k=top_k,
        router=RouterInit("random"),
        expert_names=["a", "b", "c"],
    )
    moe = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(zoo["e1"])
    assert isinstance(moe, MixtralForCausalLM) and moe.config.num_experts_per_tok == top_k
    x = ids(char_tokenizer(), "12+7=19 next b=c")
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)


def test_mixtral_experts_are_the_source_mlps(zoo, tmp_path):
    """Zero gates + top-2 of 2 = the plain average of the two experts' MLPs on the base."""
    out = build_ffn_moe(
        zoo["base"], [zoo["e1"], zoo["e2"]], tmp_path / "moe", top_k=2, router=RouterInit("random")
    )
    moe = MixtralForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()
    base, e1, e2 = (LlamaForCausalLM.from_pretrained(zoo[n]) for n in ("base", "e1", "e2"))

    class MeanMLP(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, h):
            return (self.a(h) + self.b(h)) / 2

    for i, layer in enumerate(base.model.layers):
        layer.mlp = MeanMLP(e1.model.layers[i].mlp, e2.model.layers[i].mlp)
    x = ids(char_tokenizer(), "3+4=7")
    torch.testing.assert_close(moe(x).logits, base(x).logits, rtol=1e-5, atol=1e-5)
    # the files use the classic per-expert names (w1 = gate, w3 = up, w2 = down)
    with safe_open(out / "model.safetensors", "pt") as f:
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.1.w1.weight")
        w3 = f.get_tensor("model.layers.1.block_sparse_moe.experts.1.w3.weight")
        w2 = f.get_tensor("model.layers.1.block_sparse_moe.experts.0.w2.weight")
    assert torch.equal(w1, e2.model.layers[1].mlp.gate_proj.weight)
    assert torch.equal(w3, e2.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(w2, e1.model.layers[1].mlp.down_proj.weight)
    assert json.loads((out / "mixture.json").read_text())["top_k"] == 2


def test_mixtral_gates_are_the_router_init(zoo, tmp_path):
    out = build_ffn_moe(
        zoo["base"], [zoo["e1"], zoo["e2"], zoo["e3"]], tmp_path / "moe", prompts=PROMPTS
    )
    moe = MixtralForCausalLM.from_pretrained(out)
    want = init_gates(
        RouterInit("hidden"),
        LlamaForCausalLM.from_pretrained(zoo["base"]),
        char_tokenizer(),
        PROMPTS,
        ["e1", "e2", "e3"],
        [0, 1, 2],
    )
    for i, layer in enumerate(moe.model.layers):
        torch.testing.assert_close(layer.mlp.gate.weight, want[i])
    assert moe.config.num_experts_per_tok == 2  # the paper's default for more than two experts


def test_hybrid_keeps_the_first_k_layers_dense(zoo, tmp_path):
    merged = LlamaForCausalLM.from_pretrained(zoo["base"])
    full = build_hybrid(
        merged, [zoo["e1"], zoo["e2"]], tmp_path / "h3", k=3, router=RouterInit("random")
    )
    x = ids(char_tokenizer(), "next c=d")
    torch.testing.assert_close(
        AutoModelForCausalLM.from_pretrained(full)(x).logits, merged(x).logits, rtol=1e-5, atol=1e-5
    )
    part = MixtralForCausalLM.from_pretrained(
        build_hybrid(
            merged, [zoo["e1"], zoo["e2"]], tmp_path / "h1", k=1, router=RouterInit("random")
        )
    )
    e2 = LlamaForCausalLM.from_pretrained(zoo["e2"])
    gate_up = part.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[1][:32], merged.model.layers[0].mlp.gate_proj.weight)
    assert torch.equal(
        part.model.layers[2].mlp.experts.down_proj[1], e2.model.layers[2].mlp.down_proj.weight
    )
    assert json.loads((tmp_path / "h1" / "mixture.json").read_text())["kind"] == "hybrid"


def test_weight_level_mixtures_refuse_other_architectures_and_tokenizers(zoo, tmp_path):
    wide = save_with_tokenizer(char_llama(5, hidden=32), tmp_path / "wide")
    with pytest.raises(MixtureError, match="wide: config.hidden_size = 32"):
        build_ffn_moe(zoo["base"], [zoo["e1"], wide], tmp_path / "x", router=RouterInit("random"))
    other_tok = save_with_tokenizer(
        char_llama(6), tmp_path / "othertok", char_tokenizer(extra="XYZ")
    )
    with pytest.raises(MixtureError, match="othertok: tokenizer differs"):
        build_block_level_mixture(
            zoo["base"], [zoo["e1"], other_tok], tmp_path / "y", router=RouterInit("random")
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- model-level mixture -------------------------------------------------------------------


def constructed_backbone(tok) -> LlamaForCausalLM:
    """Embeddings of 'a' and 'z' are orthogonal unit vectors: hidden states entering layer 0."""
    model = char_llama(7)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(0.01)
        emb[tok.convert_tokens_to_ids("a")] = torch.eye(16)[0]
        emb[tok.convert_tokens_to_ids("z")] = torch.eye(16)[1]
    return model


def test_model_level_routes_constructed_inputs(zoo, tmp_path):
    tok = char_tokenizer()
    backbone = save_with_tokenizer(constructed_backbone(tok), tmp_path / "backbone")
    prompts = {
        "e1": {"positive": ["qa"], "negative": ["qz"]},
        "e2": {"positive": ["qz"], "negative": ["qa"]},
    }
    out = build_model_level_mixture(
        [zoo["e1"], zoo["e2"]], tmp_path / "mix", router_backbone=backbone, layer=0, prompts=prompts
    )
    with safe_open(out / "router.safetensors", "pt") as f:
        weight = f.get_tensor("weight")
    e = torch.eye(16)
    torch.testing.assert_close(weight, torch.stack([e[0] - e[1], e[1] - e[0]]) / 2**0.5)
    mix = load_mixture(out)
    assert isinstance(mix, ModelLevelMixture)
    assert mix.route(["12a", "bbz", "a", "zz", "za"]) == [0, 1, 0, 1, 0]


def test_model_level_round_trip_and_generation(zoo, tmp_path):
    out = build_model_level_mixture(
        [zoo["e1"], zoo["e2"], zoo["e3"]],
        tmp_path / "mix",
        router_backbone=zoo["base"],
        layer=1,
        prompts=PROMPTS,
        copy_experts=True,
    )
    moved = out.rename(tmp_path / "moved")  # copies are referenced relative to the mixture
    mix = load_mixture(moved)
    texts = ["1+2=", "next a=", "last abc=", "7+7="]
    routes = mix.route(texts)
    # by hand: the state entering layer 1 at the last token, against each expert's gate
    # (the normalised mean over its positive prompts minus the mean over its negative ones)
    backbone, tok = LlamaForCausalLM.from_pretrained(zoo["base"]), char_tokenizer()

    def state(text: str) -> torch.Tensor:
        return backbone(ids(tok, text), output_hidden_states=True).hidden_states[1][0, -1]

    def mean(prompts: list[str]) -> torch.Tensor:
        return torch.stack([state(t) for t in prompts]).mean(0) if prompts else torch.zeros(16)

    gates = []
    for expert in ("e1", "e2", "e3"):
        p = PROMPTS[expert] if isinstance(PROMPTS[expert], dict) else {"positive": PROMPTS[expert]}
        g = mean(p["positive"]) - mean(p.get("negative", []))
        gates.append(g / g.norm())
    with torch.no_grad():
        assert routes == [int((torch.stack(gates) @ state(t)).argmax()) for t in texts]
    assert len(set(routes)) > 1  # the texts do go to different experts
    gens = mix.generate(texts, max_new_tokens=3)
    for text, r, g in zip(texts, routes, gens, strict=True):
        expert = LlamaForCausalLM.from_pretrained(zoo[["e1", "e2", "e3"][r]])
        x = ids(char_tokenizer(), text)
        want = expert.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)[
            0, x.shape[1] :
        ]
        assert g == char_tokenizer().decode(want, skip_special_tokens=True)


def test_model_level_mixes_experts_of_other_architectures_and_tokenizers(zoo, tmp_path):
    other = save_with_tokenizer(
        char_llama(9, hidden=32, layers=2, vocab=60),
        tmp_path / "other",
        char_tokenizer(extra="XYZ"),
    )
    out = build_model_level_mixture(
        [zoo["e1"], other],
        tmp_path / "mix",
        router_backbone=zoo["base"],
        layer=2,
        router=RouterInit("random"),
    )
    mix = load_mixture(out)
    assert mix.tokenizers[1].convert_tokens_to_ids("X") != mix.tokenizers[1].unk_token_id
    texts = ["XYZ 1+2=", "abc", "zz"]
    routes = mix.route(texts)
    assert set(routes) == {0, 1}  # both experts answer some text
    # each text is answered by its expert alone, through that expert's own tokenizer
    experts = [
        (LlamaForCausalLM.from_pretrained(zoo["e1"]), char_tokenizer()),
        (LlamaForCausalLM.from_pretrained(other), char_tokenizer(extra="XYZ")),
    ]
    for text, r, got in zip(texts, routes, mix.generate(texts, max_new_tokens=2), strict=True):
        model, tok = experts[r]
        x = ids(tok, text)
        want = model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert got == tok.decode(want[0, x.shape[1] :], skip_special_tokens=True), (text, r)
    with pytest.raises(MixtureError, match="router.layer = 3 must be in 0..2"):
        build_model_level_mixture(
            [zoo["e1"], other],
            tmp_path / "bad",
            router_backbone=zoo["base"],
            layer=3,
            router=RouterInit("random"),
        )
    notok = tmp_path / "notok"
    char_llama(1).save_pretrained(notok)
    with pytest.raises(MixtureError, match="expert notok .*no loadable tokenizer"):
        build_model_level_mixture(
            [zoo["e1"], notok],
            tmp_path / "bad",
            router_backbone=zoo["base"],
            layer=0,
            router=RouterInit("random"),
        )


# --- block-level mixture -------------------------------------------------------------------


def hand_block_routes(mix: BlockLevelMixture, text: str) -> list[int]:
    """Layer by layer: pool the state entering layer l along the path chosen so far."""
    path: list[int] = []
    x = ids(mix.tokenizer, text)
    for layer in range(mix.config.num_hidden_layers):
        probe = mix.path_model(tuple(path + [0] * (mix.config.num_hidden_layers - len(path))))
        h = probe(x, output_hidden_states=True).hidden_states[layer][0]
        pooled = h.mean(0) if mix.pooling == "mean" else h[0]
        path.append(int((mix.gates[layer].weight @ pooled).argmax()))
    return path


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_block_level_routes_per_layer_on_real_tokens(zoo, tmp_path, pooling):
    out = build_block_level_mixture(
        zoo["base"],
        [zoo["e1"], zoo["e2"], zoo["e3"]],
        tmp_path / "blk",
        router=RouterInit("random", seed=1),
        pooling=pooling,
    )
    mix = load_mixture(out)
    assert isinstance(mix, BlockLevelMixture)
    texts = ["1+2=3", "next q=r", "last abcdef=f", "zz"]
    routes = mix.route_texts(texts)  # one padded batch
    assert [list(r) for r in routes] == [hand_block_routes(mix, t) for t in texts]
    assert len(set(routes)) > 1  # the constructed inputs do take different paths


def test_block_level_round_trip_and_logits(zoo, tmp_path):
    experts = [zoo["e1"], zoo["e2"]]
    out = build_block_level_mixture(
        zoo["base"], experts, tmp_path / "blk", prompts={"e1": ["1+2="], "e2": ["next a="]}
    )
    mix = load_mixture(out)
    tok = mix.tokenizer
    x = ids(tok, "next a=b")
    path = tuple(mix.route_ids(x)[0].tolist())
    e = [LlamaForCausalLM.from_pretrained(p) for p in experts]
    dense = LlamaForCausalLM.from_pretrained(zoo["base"])
    dense.model.layers = torch.nn.ModuleList(e[j].model.layers[i] for i, j in enumerate(path))
    torch.testing.assert_close(mix(x), dense(x).logits, rtol=1e-5, atol=1e-5)
    again = load_mixture(out)
    torch.testing.assert_close(again(x), mix(x))


def test_block_level_of_identical_experts_equals_dense(zoo, tmp_path):
    out = build_block_level_mixture(
        zoo["e2"],
        [zoo["e2"], zoo["e2"]],
        tmp_path / "blk",
        router=RouterInit("random"),
        expert_names=["a", "b"],
    )
    x = ids(char_tokenizer(), "last xyz=z")
    torch.testing.assert_close(
        load_mixture(out)(x),
        LlamaForCausalLM.from_pretrained(zoo["e2"])(x).logits,
        rtol=1e-5,
        atol=1e-5,
    )


# --- fitted router and router accuracy -----------------------------------------------------


def test_linear_router_fits_separable_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    label = torch.arange(60) % 3
    x = centers[label] + 0.3 * torch.randn(60, 8, generator=g)
    correct = torch.nn.functional.one_hot(label, 3)
    correct[:5] = 0  # nobody answers these: dropped
    fitted = fit_linear_router(x, correct)
    assert fitted.n_train == 55 and fitted.train_accuracy == 1.0
    test_label = torch.arange(30) % 3
    test_x = centers[test_label] + 0.3 * torch.randn(30, 8, generator=g)
    assert ((test_x @ fitted.weight.T + fitted.bias).argmax(1) == test_label).all()


def test_router_accuracy_counts_answerable_samples():
    correct = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [0, 1]], dtype=torch.float)
    labels = ExpertCorrectness(
        ["t1", "t1", "t1", "t2", "t2"], [0, 1, 2, 0, 1], ["a"] * 5, correct, ["x", "y"]
    )
    acc = {a.task: a for a in router_accuracy([0, 0, 1, 0, 0], labels)}
    assert acc["t1"].accuracy == pytest.approx(2 / 3) and acc["t1"].coverage == 1.0
    assert acc["t2"].accuracy == 0.0 and acc["t2"].n_answerable == 1 and acc["t2"].coverage == 0.5
    assert acc["all"].accuracy == pytest.approx(2 / 4) and acc["all"].n_samples == 5


def test_model_level_references_store_experts_relatively(zoo, tmp_path):
    """Experts inside ``relative_to`` (an artifact store) are referenced relative to the
    mixture's final location, so the store can move as a whole; others stay absolute."""
    import shutil

    store = tmp_path / "store"
    inside = store / "model" / "k1"
    shutil.copytree(zoo["e1"], inside)
    final = store / "mixture" / "m1"
    out = build_model_level_mixture(
        [inside, zoo["e2"]],
        tmp_path / "staging",  # built elsewhere, renamed into place, as the store does
        router_backbone=inside,
        layer=1,
        prompts={"k1": PROMPTS["e1"], "e2": PROMPTS["e2"]},
        expert_names=["k1", "e2"],
        relative_to=store,
        location=final,
    )
    final.parent.mkdir(parents=True)
    out.rename(final)
    record = json.loads((final / "mixture.json").read_text())
    assert [e["path"] for e in record["experts"]] == [
        "../../model/k1",
        str(Path(zoo["e2"]).absolute()),
    ]
    assert record["router"]["backbone"] == "../../model/k1"
    before = load_mixture(final).route(["1+2=", "last abc="])
    moved = store.rename(tmp_path / "elsewhere")
    assert load_mixture(moved / "mixture" / "m1").route(["1+2=", "last abc="]) == before
