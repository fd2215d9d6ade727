"""The stage protocol (tasks/stage.py) with a toy stage that counts its executions, and the
key coverage of every pipeline stage: each ``compute`` parameter changes the key unless it
is declared ``not_in_key``."""

from __future__ import annotations

import importlib
import shutil
import threading
import time
from collections import Counter

import pytest
from prefect.states import State

from flows.runners import STAGE_MODULES
from model_glue.checkpoint import CheckpointError
from storage import ArtifactStore
from tasks.stage import RECORD_KIND, REUSED, Component, Stage, call, for_call

RUNS: Counter = Counter()


def _toy(store: ArtifactStore, key: str, x: int, scale: int = 2, device: str = "cpu") -> dict:
    RUNS[x] += 1
    if x < 0:
        raise CheckpointError(f"toy input {x} is\n negative")
    if x == 13:
        raise RuntimeError("unlucky")
    if x == 7:
        time.sleep(0.3)  # long enough for a second caller to wait on the lock
    return {"y": x * scale}


TOY = Stage("toy", compute=_toy, uses=Component("toy", "1"), not_in_key={"device": "where it runs"})
toy = TOY.task()


@pytest.fixture
def store_url(tmp_path):
    RUNS.clear()
    return str(tmp_path / "store")


def run(store_url: str, **params):
    return toy.fn(store_url=store_url, **params)


def test_a_stored_record_is_found_not_computed_again(store_url):
    first = run(store_url, x=1)
    assert first["y"] == 2 and REUSED not in first
    again = run(store_url, x=1)
    assert again[REUSED] is True and again["y"] == 2
    assert RUNS[1] == 1


def test_a_keyed_parameter_or_default_changes_the_key_and_a_declared_one_does_not(store_url):
    run(store_url, x=1)
    run(store_url, x=1, scale=3)  # a keyed parameter
    assert RUNS[1] == 2
    run(store_url, x=1, scale=2)  # the default written out: the same call as the first
    run(store_url, x=1, device="cuda:1")  # declared not_in_key
    assert RUNS[1] == 2
    assert TOY.key({"x": 1}) == TOY.key({"x": 1, "scale": 2}) != TOY.key({"x": 1, "scale": 3})


def test_concurrent_calls_with_one_key_compute_once(store_url):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(run(store_url, x=7))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert RUNS[7] == 1
    assert sorted(r.get(REUSED, False) for r in results) == [False, True, True]


def test_an_input_error_is_a_one_line_failure_and_stores_nothing(store_url):
    state = run(store_url, x=-1)
    assert isinstance(state, State) and state.is_failed()
    assert state.message == "CheckpointError: toy input -1 is negative"
    store = ArtifactStore(store_url)
    assert not store.exists(RECORD_KIND, TOY.key({"x": -1}))
    run(store_url, x=-1)
    assert RUNS[-1] == 2  # nothing was cached: the next run tries again


def test_a_bug_raises_and_stores_nothing(store_url):
    with pytest.raises(RuntimeError, match="unlucky"):
        run(store_url, x=13)
    assert not ArtifactStore(store_url).exists(RECORD_KIND, TOY.key({"x": 13}))


def test_for_call_refreshes_prefects_cache_only_when_the_store_lacks_the_record(store_url):
    c = call(toy, "one", x=1)
    store = ArtifactStore(store_url)
    assert for_call(c, store) is not c.task  # nothing stored: ignore Prefect's cache
    run(store_url, x=1)
    assert for_call(c, store) is c.task
    shutil.rmtree(store.local_path(RECORD_KIND, c.key))
    assert for_call(c, store) is not c.task


def test_a_call_with_a_parameter_compute_does_not_take_is_a_bug():
    with pytest.raises(TypeError, match="colour"):
        call(toy, "bad", x=1, colour="red")


def test_not_in_key_must_name_parameters_and_key_parts_cannot_add_any():
    with pytest.raises(TypeError, match="batch_size"):
        Stage("bad", compute=_toy, uses=Component("bad", "1"), not_in_key={"batch_size": "?"})
    extra = Stage("bad", compute=_toy, uses=Component("bad", "1"), key_parts=lambda a: {"z": 1})
    with pytest.raises(TypeError, match="'z'"):
        extra.key({"x": 1})


# -- key coverage of the pipeline's stages ---------------------------------------------


def _model(fp: str, name: str = "m") -> dict:
    return {"name": name, "fingerprint": fp, "uri": f"/zoo/{name}", "arch_signature": "llama"}


def _samples(tasks_a: str, tasks_b: str, adapters: list[str]) -> dict[str, tuple[dict, dict]]:
    """Per stage: a call's parameters, and for every keyed parameter another value that
    must give another key."""
    a, b, c = _model("fa", "a"), _model("fb", "b"), _model("fc", "c")
    return {
        "fingerprint": (
            {"name": "a", "uri": "/zoo/a"},
            {
                "uri": "/zoo/b",
                "sketch_k": 16,
                "sketch_seed": 1,
                "source": {"repo": "o/m", "revision": "main", "commit": "c" * 40, "files": {}},
            },
        ),
        "adapter": (
            {"name": "a", "adapter": adapters[0], "base": a},
            {"adapter": adapters[1], "base": b},
        ),
        "discover": (
            {"query": {"base_model": "o/base"}, "repos": ["o/a"]},
            {"query": {"base_model": "o/base", "limit": 2}, "repos": ["o/a", "o/b"]},
        ),
        "similarity": (
            {"models": [a, b], "groups": ["attn"]},
            {
                "models": [a, c],
                "groups": ["mlp"],
                "base": c,
                "exact": True,
                "metric": "sim_mlp",
                "threshold": 0.9,
            },
        ),
        "cluster": (
            {
                "models": [a, b],
                "similarity_keys": ["s1"],
                "metric": "sim_all",
                "threshold": "auto",
                "related": [],
            },
            {
                "models": [a, c],
                "similarity_keys": ["s2"],
                "metric": "sim_mlp",
                "threshold": 0.5,
                "related": [["fa", "fb"]],
            },
        ),
        "evaluate": (
            {
                "model": a,
                "tasks": ["t"],
                "limit": None,
                "batch_size": 8,
                "include_paths": [tasks_a],
            },
            {
                "model": b,
                "tasks": ["u"],
                "limit": 5,
                "include_paths": [tasks_b],
                "dtype": "bfloat16",
                "backend": "vllm",
                "split": "proxy",
            },
        ),
        "filter": (
            {
                "members": [a, b],
                "base": None,
                "method": "linear",
                "params": {},
                "settings": {"strategy": "greedy"},
                "proxy_tasks": ["t"],
                "proxy_limit": 4,
                "include_paths": [tasks_a],
            },
            {
                "members": [a, c],
                "base": c,
                "method": "ties",
                "params": {"density": 0.5},
                "settings": {"strategy": "evolutionary"},
                "proxy_tasks": ["u"],
                "proxy_limit": 5,
                "include_paths": [tasks_b],
                "proxy_metric": "acc",
                "dtype": "bfloat16",
                "tokenizer": "base",
            },
        ),
        "merge": (
            {
                "label": "c0",
                "members": [a, b],
                "method": "task_arithmetic",
                "params": {},
                "base": c,
            },
            {
                "members": [a, _model("fd", "d")],
                "method": "model_stock",
                "params": {"lambda": 0.5},
                "dtype": "bfloat16",
                "base": b,
                "tokenizer": "base",
            },
        ),
        "mixture": (
            {
                "experts": [a, b],
                "backbone": a,
                "settings": {"variant": "model_level", "router": "linear"},
                "prompts": {"a": {"t": ["p"]}},
                "accuracy_tasks": ["t"],
                "accuracy_limit": 4,
                "include_paths": [tasks_a],
            },
            {
                "experts": [a, c],
                "backbone": b,
                "settings": {"variant": "ffn_moe", "router": "hidden", "top_k": 2},
                "prompts": {"a": {"t": ["q"]}},
                "accuracy_tasks": ["u"],
                "accuracy_limit": 5,
                "include_paths": [tasks_b],
                "accuracy_metric": "acc",
                "labels": "select-key",
                "dtype": "bfloat16",
            },
        ),
        "select": (
            {
                "candidates": [a, b],
                "proxy_keys": {"a": "k"},
                "backbone": a,
                "layer": 1,
                "pooling": "mean",
            },
            {
                "candidates": [a, c],
                "proxy_keys": {"a": "k2"},
                "backbone": b,
                "layer": 2,
                "pooling": "last",
                "metric": "acc",
                "max_experts": 2,
                "folds": 3,
                "seed": 1,
                "fixed": True,
                "dtype": "bfloat16",
            },
        ),
        "final": (
            {"candidates": [a | {"artifact_id": "x"}], "proxy_keys": {"a": "k"}},
            {"candidates": [a | {"artifact_id": "y"}], "proxy_keys": {"a": "k2"}, "metric": "acc"},
        ),
    }


def _adapter(path, r: int) -> str:
    """A LoRA adapter directory (config and weights; content is what is keyed)."""
    import json

    import torch
    from safetensors.torch import save_file

    path.mkdir()
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"x.lora_A.weight": torch.zeros(r, 4)}, path / "adapter_model.safetensors")
    return str(path)


def _stages() -> list[Stage]:
    found = {}
    for module in STAGE_MODULES:
        for value in vars(importlib.import_module(module)).values():
            if isinstance(getattr(value, "stage", None), Stage):
                found[value.stage.name] = value.stage
    return sorted(found.values(), key=lambda s: s.name)


def test_every_compute_parameter_is_keyed_or_declared_out_of_the_key(tmp_path):
    """Adding a parameter to a stage's compute without a value here fails this test; a
    normalisation (key_parts) that loses a parameter's value fails it too."""
    (tmp_path / "ta").mkdir()
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "task.yaml").write_text("task: u\n")
    adapters = [_adapter(tmp_path / f"ad{r}", r) for r in (2, 4)]
    samples = _samples(str(tmp_path / "ta"), str(tmp_path / "tb"), adapters)
    stages = _stages()
    assert sorted(s.name for s in stages) == sorted(samples)
    for stage in stages:
        params, others = samples[stage.name]
        keyed = set(stage.parameters) - set(stage.not_in_key)
        assert set(others) == keyed, f"{stage.name}: give every keyed parameter another value"
        assert all(why.strip() for why in stage.not_in_key.values()), stage.name
        assert set(stage.identity(params)["in"]) == keyed, stage.name
        key = stage.key(params)
        for name, other in others.items():
            assert stage.key(params | {name: other}) != key, f"{stage.name}: {name} not in key"
        for name in stage.not_in_key:
            default = stage.parameters[name].default
            changed = "elsewhere" if default is None or isinstance(default, str) else not default
            assert stage.key(params | {name: changed}) == key, f"{stage.name}: {name} keyed"
