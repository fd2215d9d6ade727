"""The lm-eval model class of model-level and block-level mixtures, against hand computation."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import LlamaForCausalLM

from model_glue.mixture import (
    MixtureError,
    MixtureLM,
    RouterInit,
    build_block_level_mixture,
    build_ffn_moe,
    build_model_level_mixture,
    expert_correctness,
    load_mixture,
    mixture_router_accuracy,
)
from tests.factories import PROMPTS, char_tokenizer, save_experts


@pytest.fixture
def zoo(tmp_path):
    return save_experts(tmp_path)


@torch.no_grad()
def loglik(model, tok, context: str, continuation: str) -> float:
    ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
    x = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(x).logits[0, :-1], -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


PAIRS = [("1+2=", "3"), ("next a=", "b"), ("last abc=", "c"), ("9+9=", "18")]


def test_model_level_lm_scores_with_the_routed_expert(zoo, tmp_path):
    out = build_model_level_mixture(
        [zoo["e1"], zoo["e2"], zoo["e3"]],
        tmp_path / "mix",
        router_backbone=zoo["base"],
        layer=2,
        prompts=PROMPTS,
    )
    lm = MixtureLM(pretrained=str(out), batch_size=2)
    got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    routes = lm.mixture.route([c for c, _ in PAIRS])
    tok = char_tokenizer()
    for (ctx, cont), r, (ll, _) in zip(PAIRS, routes, got, strict=True):
        expert = LlamaForCausalLM.from_pretrained(zoo[["e1", "e2", "e3"][r]])
        assert ll == pytest.approx(loglik(expert, tok, ctx, cont), abs=1e-4)
    gens = lm.generate_until(
        requests(
            "generate_until",
            [(c, {"until": ["\n"], "max_gen_toks": 3, "do_sample": False}) for c, _ in PAIRS],
        )
    )
    assert gens == [
        g for g in lm.mixture.generate([c for c, _ in PAIRS], max_new_tokens=3, until=["\n"])
    ]
    assert sum(lm.route_counts().values()) == len(PAIRS)


def test_block_level_lm_routes_on_the_context(zoo, tmp_path):
    out = build_block_level_mixture(
        zoo["base"], [zoo["e1"], zoo["e2"]], tmp_path / "blk", router=RouterInit("random", seed=2)
    )
    mix = load_mixture(out)
    lm = MixtureLM(mix, batch_size=3)
    got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (ctx, cont), (ll, _) in zip(PAIRS, got, strict=True):
        path = mix.route_texts([ctx])[0]
        assert ll == pytest.approx(loglik(mix.path_model(path), mix.tokenizer, ctx, cont), abs=1e-4)


def test_mixtures_load_on_the_asked_device_and_dtype(zoo, tmp_path, monkeypatch):
    """``device`` and ``dtype`` reach every model of a model-level and a block-level
    mixture and the HFLM each route is scored with; gates stay float32; a bf16 mixture
    scores like the float32 one within bf16's precision."""
    import model_glue.mixture.lm as lm_module
    from model_glue.devices import DeviceError

    model_level = build_model_level_mixture(
        [zoo["e1"], zoo["e2"]], tmp_path / "mix", router_backbone=zoo["base"], layer=1,
        prompts={"e1": ["1+2="], "e2": ["next a="]},
    )  # fmt: skip
    block_level = build_block_level_mixture(
        zoo["base"], [zoo["e1"], zoo["e2"]], tmp_path / "blk", router=RouterInit("random", seed=2)
    )
    seen = []
    real_hflm = lm_module.HFLM

    def spy(pretrained, **kw):
        seen.append((pretrained.device.type, pretrained.dtype))
        return real_hflm(pretrained=pretrained, **kw)

    monkeypatch.setattr(lm_module, "HFLM", spy)
    for path in (model_level, block_level):
        lm16 = MixtureLM(pretrained=str(path), device="cpu", dtype="bfloat16", batch_size="auto")
        lm32 = MixtureLM(pretrained=str(path), device="cpu", dtype="float32")
        params = [(n.split(".")[0], p.dtype) for n, p in lm16.mixture.named_parameters()]
        assert {d for top, d in params if top not in ("gate", "gates")} == {torch.bfloat16}
        assert {d for top, d in params if top in ("gate", "gates")} == {torch.float32}
        gates16, gates32 = (
            [p for n, p in lm.mixture.named_parameters() if n.split(".")[0] in ("gate", "gates")]
            for lm in (lm16, lm32)
        )
        assert all(torch.equal(a, b) for a, b in zip(gates16, gates32, strict=True))
        assert lm16.route([c for c, _ in PAIRS]) == lm32.route([c for c, _ in PAIRS])
        got16 = lm16.loglikelihood(requests("loglikelihood", PAIRS))
        got32 = lm32.loglikelihood(requests("loglikelihood", PAIRS))
        for (a, _), (b, _) in zip(got16, got32, strict=True):
            assert a == pytest.approx(b, rel=0.05, abs=0.1)
    assert set(seen) == {("cpu", torch.bfloat16), ("cpu", torch.float32)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        load_mixture(model_level, device="cuda")


def test_mixtral_is_refused_by_the_mixture_lm(zoo, tmp_path):
    out = build_ffn_moe(
        zoo["base"], [zoo["e1"], zoo["e2"]], tmp_path / "moe", router=RouterInit("random")
    )
    with pytest.raises(MixtureError, match="evaluate a Mixtral directory with the 'hf' model"):
        MixtureLM(pretrained=str(out))


TASK_YAML = """task: mix_probe
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_router_accuracy_matches_the_mixture_score(zoo, tmp_path):
    """Model-level: the mixture answers with its routed expert, so its exact-match score equals
    the mean correctness of the routed experts, sample by sample. Expert e1 always says "1111",
    e2 "2222"; the probe task's answers are one or the other."""
    import json

    from model_glue.evaluate import evaluate

    out = build_model_level_mixture(
        [zoo["e1"], zoo["e2"]],
        tmp_path / "mix",
        router_backbone=zoo["base"],
        layer=1,
        prompts={"e1": ["1+2=", "3+3="], "e2": ["next a=", "last b="]},
    )
    mix = load_mixture(out)
    with torch.no_grad():
        for expert, tok, digit in zip(mix.experts, mix.tokenizers, "12", strict=True):
            # residual stream = the constant e0 at every position, read out as `digit`
            expert.model.embed_tokens.weight.zero_()
            expert.model.embed_tokens.weight[:, 0] = 1.0
            for layer in expert.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            expert.lm_head.weight.zero_()
            expert.lm_head.weight[tok.convert_tokens_to_ids(digit), 0] = 1.0
    docs = [
        {"prompt": p, "answer": a}
        for p in ["1+2=", "4+4=", "next c=", "last dog=", "7+1=", "next z="]
        for a in ("1111", "2222")
    ]
    (tmp_path / "tasks").mkdir()
    data = tmp_path / "tasks" / "probe.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tasks" / "probe.yaml").write_text(TASK_YAML.format(data=data))
    labels = expert_correctness(mix, ["mix_probe"], include_paths=[str(tmp_path / "tasks")])
    # the task has one split: the test split is what selection's held-out slice leaves
    from model_glue.splits import HOLDOUT_EVERY

    docs = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY]
    want_correct = [[float(d["answer"] == "1111"), float(d["answer"] == "2222")] for d in docs]
    assert labels.correct.tolist() == want_correct
    routes = mix.route(labels.contexts)
    assert 0 < sum(routes) < len(routes)  # both experts receive samples
    lm = MixtureLM(mix)
    score = evaluate(lm, ["mix_probe"], include_paths=[str(tmp_path / "tasks")])
    hits = [want_correct[i][r] for i, r in enumerate(routes)]
    assert [s.value for s in score if s.metric == "exact_match"] == [
        pytest.approx(sum(hits) / len(hits))
    ]
    acc = {a.task: a for a in mixture_router_accuracy(mix, labels)}["mix_probe"]
    assert (
        acc.n_samples == len(docs) == 9
        and acc.coverage == 1.0
        and acc.accuracy == pytest.approx(sum(hits) / len(docs))
    )
