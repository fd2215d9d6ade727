"""Real zoos: device and dtype settings reach every lm-eval call, and the search keeps one
model resident (lazy members, merged tensor by tensor into the model) with the same results."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from model_glue.checkpoint import Checkpoint, LazyTensors
from model_glue.devices import DeviceError, resolve_device, resolve_dtype
from model_glue.merge.registry import CHUNK
from model_glue.search import TrialSpec
from model_glue.search.proxy import ProxyScorer, load_state_dict
from tests.factories import lineage, write_config, zoo_entries


def test_device_choice_is_explicit_and_checked():
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    assert resolve_device("cuda:1", cuda_available=True) == "cuda:1"
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(DeviceError, match="expected auto, cpu"):
        resolve_device("tpu")


def test_dtype_defaults_follow_the_device():
    assert resolve_dtype("auto", "cpu", torch.bfloat16) is torch.float32
    assert resolve_dtype("auto", "cuda", torch.bfloat16) is torch.bfloat16
    assert resolve_dtype(None, "cuda:0", "BF16") is torch.bfloat16  # fingerprint codes
    assert resolve_dtype("auto", "cuda", "F16") is torch.float16
    assert resolve_dtype("auto", "cuda", torch.int64) is torch.float32
    assert resolve_dtype("bfloat16", "cpu", torch.float32) is torch.bfloat16
    with pytest.raises(DeviceError, match="dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_vllm_backend_without_the_package_is_a_config_error():
    import importlib.util

    from model_glue.config import ConfigError, parse_config

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    data = {"zoo": [{"name": "a", "path": "/x"}], "evaluation": {"tasks": ["t"], "backend": "vllm"}}
    with pytest.raises(ConfigError, match=r"evaluation: .*pip install 'model-glue\[vllm\]'"):
        parse_config(data, "glue.yaml")
    data["evaluation"] |= {"backend": "hf", "device": "gpu0"}
    with pytest.raises(ConfigError, match="evaluation.device"):
        parse_config(data, "glue.yaml")


class _Stop(Exception):
    pass


def test_device_and_dtype_reach_the_evaluation_model(tiny_family, monkeypatch):
    """A spy in place of lm-eval's HFLM sees the model on the asked device and dtype."""
    import lm_eval.models.huggingface as hf

    from model_glue.evaluate import evaluate

    seen = []

    def spy(pretrained, **kw):
        seen.append((pretrained.device.type, pretrained.dtype, kw["batch_size"]))
        raise _Stop

    monkeypatch.setattr(hf, "HFLM", spy)
    path = tiny_family["a"]
    for dtype in ("bfloat16", None):
        with pytest.raises(_Stop):
            evaluate(path, ["demo_add"], device="cpu", dtype=dtype, batch_size="auto")
    assert seen == [("cpu", torch.bfloat16, "auto"), ("cpu", torch.float32, "auto")]


def test_the_vllm_backend_gets_the_model_directory_and_dtype(tiny_family, monkeypatch):
    """vllm cannot be installed here (it brings its own CUDA torch): a stand-in for
    lm-eval's ``vllm`` model class sees what a GPU machine's would."""
    import sys
    import types

    from model_glue.evaluate import evaluate

    seen = []

    class VLLM:
        def __init__(self, **kw):
            seen.append(kw)
            raise _Stop

    fake = types.ModuleType("lm_eval.models.vllm_causallms")
    fake.VLLM = VLLM
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", fake)
    path = tiny_family["a"]
    with pytest.raises(_Stop):
        evaluate(path, ["demo_add"], backend="vllm", device="cpu", dtype="bfloat16", batch_size=8)
    assert seen == [
        {"pretrained": str(path), "dtype": "bfloat16", "batch_size": 8, "trust_remote_code": False}
    ]


def test_the_search_model_takes_the_evaluation_dtype(tiny_family):
    scorer = ProxyScorer.from_checkpoints(
        {n: tiny_family[n] for n in ("a", "b")},
        ["demo_add"],
        limit=2,
        device="cpu",
        dtype="bfloat16",
        batch_size=4,
    )
    assert scorer.model.dtype is torch.bfloat16 and scorer.model.device.type == "cpu"
    assert scorer.proxy.batch_size == 4
    assert all(isinstance(s, LazyTensors) for s in scorer.states.values())


def test_a_trial_holds_one_tensor_per_member_not_their_state_dicts(tiny_family, monkeypatch):
    """Tensors read from the members are counted while alive: during a merge of four
    models at most one tensor per model (plus the reference) lives at a time, and none
    survives the trial."""
    names = ["a", "b", "c", "d"]
    scorer = ProxyScorer.from_checkpoints(
        {n: tiny_family[n] for n in names},
        ["demo_add"],
        limit=2,
        base=tiny_family["base"],
        method_params={"ties": {"density": 0.5}},
    )
    scorer.proxy = lambda model: 0.0  # count the merge, not lm-eval
    alive: set[int] = set()
    peak = [0]
    read = Checkpoint.tensor

    def counted(self, name):
        t = read(self, name)
        key = id(t)
        alive.add(key)
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(t, alive.discard, key)
        return t

    monkeypatch.setattr(Checkpoint, "tensor", counted)
    n_tensors = len(scorer.tensor_names)
    for spec in (
        TrialSpec(dict.fromkeys(names, 0.25), "linear"),
        TrialSpec(dict.fromkeys(names, 0.5), "ties"),
    ):
        scorer(spec)
        gc.collect()
        assert not alive, "a member tensor outlived the trial"
    assert 0 < peak[0] <= len(names) + 2 < n_tensors
    assert peak[0] < n_tensors * len(names)  # a resident cluster would hold all of them


def test_lazy_members_give_the_same_merges_as_resident_ones(tiny_family):
    paths = {n: tiny_family[n] for n in ("a", "b", "c")}
    fixed = {"ties": {"density": 0.5}}
    lazy = ProxyScorer.from_checkpoints(
        paths, ["demo_add"], limit=2, base=tiny_family["base"], method_params=fixed
    )
    resident = ProxyScorer(
        {n: load_state_dict(p) for n, p in paths.items()},
        lazy.model,
        lazy.proxy,
        base=load_state_dict(tiny_family["base"]),
        method_params=fixed,
    )
    for spec in (
        TrialSpec({"a": 0.6, "c": 0.4}, "linear"),
        TrialSpec({"a": 1.0, "b": 1.0, "c": 1.0}, "ties"),
        TrialSpec({"a": 0.5, "c": 0.5}, "task_arithmetic"),
    ):
        a, b = lazy.merge(spec), resident.merge(spec)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), spec
        lazy.merge_into_model(spec)
        assert all(torch.equal(lazy._target[k], a[k]) for k in a)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lazy_chunked_merges_equal_resident_ones_bit_for_bit(tiny_llama, dtype):
    """Tensors larger than one chunk (a 5000 x 64 embedding) are merged chunk by chunk
    from disk; every chunked method, with and without per-tensor sums, gives the bits of
    the resident merger."""
    from model_glue.merge.memory import Merger

    base = tiny_llama("base", seed=0, hidden=64, vocab=5000, dtype=dtype)
    paths = [base] + [tiny_llama(f"m{i}", seed=i + 1, base=base, dtype=dtype) for i in range(3)]
    lazy = [LazyTensors(str(p)) for p in paths]
    assert max(map(math.prod, lazy[0].shapes.values())) > CHUNK
    resident = [{n: lz[n] for n in lz} for lz in lazy]
    for method, params in (
        ("linear", {}),
        ("task_arithmetic", {"lambda": 0.8}),
        ("dare_linear", {"density": 0.4, "rescale": "l1"}),
        ("dare_ties", {"density": 0.5}),
    ):
        with_base = method != "linear"
        args = dict(params=params, model_params=[{"weight": w} for w in (0.5, 0.3, 0.2)])
        a = Merger(method, lazy[1:], lazy[0] if with_base else None, **args)
        b = Merger(method, resident[1:], resident[0] if with_base else None, **args)
        assert a.streaming and not b.streaming
        got, want = a(), b()
        assert all(torch.equal(got[k], want[k]) for k in want), method


def test_paper_presets_name_lm_evals_own_tasks():
    """Resolved with lm-eval's task index (no data is downloaded)."""
    from model_glue.evaluate import unknown_tasks
    from model_glue.presets import PRESETS

    for name, metrics in PRESETS.items():
        assert unknown_tasks(list(metrics)) == [], name


def test_presets_expand_in_the_config_with_their_metrics():
    from model_glue.config import ConfigError, parse_config

    zoo = [{"name": "a", "path": "/x"}]
    with pytest.raises(ConfigError, match="mbpp, humaneval execute the model's generated code"):
        parse_config({"zoo": zoo, "evaluation": {"preset": "model-glue-paper"}}, "g.yaml")
    cfg = parse_config(
        {
            "zoo": zoo,
            "evaluation": {"preset": "model-glue-paper", "allow_code_execution": True},
            "filter": {"proxy_preset": "model-glue-paper-tiny", "proxy_metric": {"tinyArc": "acc"}},
        }
    )
    assert cfg.evaluation.tasks[:3] == ["arc_challenge", "winogrande", "mmlu"]
    assert cfg.evaluation.metrics["gsm8k"] == "exact_match,strict-match"
    proxy = cfg.metrics_for(cfg.filter.proxy_tasks)
    assert proxy["tinyArc"] == "acc" and proxy["tinyGSM8k"] == "exact_match,strict-match"
    assert "arc_challenge" not in proxy


def test_proxy_reads_each_tasks_own_metric():
    from model_glue.evaluate import Score, TaskError
    from model_glue.search.proxy import LmEvalProxy

    scores = [
        Score("a", "acc", 0.2, None, 10),
        Score("a", "acc_norm", 0.4, None, 10),
        Score("b", "exact_match,strict-match", 0.6, None, 10),
        Score("b", "exact_match,flexible-extract", 0.9, None, 10),
    ]
    proxy = LmEvalProxy(
        ["a", "b"], None, limit=1, metric={"a": "acc_norm", "b": "exact_match,strict-match"}
    )
    assert proxy._mean(scores) == pytest.approx(0.5)
    with pytest.raises(TaskError, match="proxy task 'b' reports several metrics"):
        LmEvalProxy(["a", "b"], None, limit=1, metric={"a": "acc"})._mean(scores)


def test_the_flow_places_stages_by_the_config(monkeypatch):
    """What the recipe hands the evaluate and filter stages: the resolved device and the
    dtype that their keys hold."""
    from flows.steps import placement as _placement
    from model_glue.config import parse_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    base = {"zoo": [{"name": "a", "path": "/x"}], "evaluation": {"tasks": ["t"]}}
    cfg = parse_config(base)
    assert _placement(cfg, "BF16") == {"device": "cuda", "dtype": "bfloat16"}
    assert _placement(cfg, "F32") == {"device": "cuda", "dtype": "float32"}
    cfg = parse_config(
        base | {"evaluation": {"tasks": ["t"], "device": "cuda:1", "dtype": "float16"}}
    )
    assert _placement(cfg, "BF16") == {"device": "cuda:1", "dtype": "float16"}
    cfg = parse_config(base | {"evaluation": {"tasks": ["t"], "device": "cpu"}})
    assert _placement(cfg, "BF16") == {"device": "cpu", "dtype": "float32"}


@pytest.mark.slow
def test_every_model_forward_of_a_run_uses_the_evaluation_dtype(
    demo_zoo, prefect_harness, tmp_path, monkeypatch
):
    """``evaluation.dtype: bfloat16`` reaches every forward pass of a run: zoo evaluations,
    search trials, the expert selection's router features, the fitted router, router
    accuracy and the mixture's own evaluation (a spy on every Llama forward)."""
    from transformers.models.llama import modeling_llama

    from flows.glue_recipe import run_config

    seen = set()
    forward = modeling_llama.LlamaModel.forward

    def spy(self, *args, **kwargs):
        seen.add((self.embed_tokens.weight.device.type, self.embed_tokens.weight.dtype))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", spy)
    config = write_config(
        tmp_path / "glue.yaml",
        zoo_entries(demo_zoo / "models", {"base-a": ["add-a", "next-a"]}),
        evaluation={
            "tasks": ["demo_add", "demo_next"],
            "limit": 12,
            "device": "cpu",
            "dtype": "bfloat16",
        },
        filter={"strategy": "average", "proxy_limit": 12},
        mixture={"variant": "model_level", "router": "linear", "layer": 2},
    )
    summary = run_config(config)
    assert summary["mixture"] is not None, summary
    assert seen == {("cpu", torch.bfloat16)}
    db = lineage(tmp_path / "lineage.duckdb")
    stages = set(db.query("SELECT DISTINCT stage FROM runs WHERE status = 'completed'")["stage"])
    assert {"evaluate", "filter", "select", "mixture"} <= stages
