"""Selection reads the proxy split only: splits, expert selection, the fitted router, the
final choice (never below the best single model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_glue.mixture.selection import greedy_select, routed_score
from model_glue.splits import HOLDOUT_EVERY, restrict
from tests.factories import lineage, write_config, zoo_entries


def _separable(n: int = 120, seed: int = 0):
    """Documents of two tasks with features that tell them apart (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    task = torch.arange(n) % 2
    features = torch.randn(n, 8, generator=g) * 0.3
    features[:, 0] += torch.where(task == 0, 2.0, -2.0)
    return task, features


def test_a_fitted_router_beats_random_routing_on_separable_prompts():
    task, features = _separable()
    correct = torch.stack([(task == 0).float(), (task == 1).float()], 1)  # one expert per task
    fitted = routed_score(features, correct, [0, 1])
    g = torch.Generator().manual_seed(1)
    random_picks = torch.randint(0, 2, (len(task),), generator=g)
    random = float(correct[torch.arange(len(task)), random_picks].mean())
    assert fitted > 0.95 and random < 0.65 and fitted > random + 0.3


def test_a_model_with_a_unique_skill_enters_and_selection_stops_when_nothing_helps():
    task, features = _separable()
    merged = (task == 0).float()  # good at task 0 only (the cluster's merge)
    unique = (task == 1).float() * 0.9  # the rejected model: the only one good at task 1
    copy = merged.clone()  # adds nothing over the merge
    weak = torch.zeros(len(task))  # never right
    correct = torch.stack([merged, unique, copy, weak], 1)
    names = ["merged", "rejected-unique", "copy", "weak"]
    result = greedy_select(features, correct, names)
    assert result.selected == ["merged", "rejected-unique"]
    assert result.score > 0.9
    # every evaluated set is a trial; the last round evaluated the rest and added none
    assert result.trials[0].experts == ["merged"]
    last_round = [t for t in result.trials if len(t.experts) == 3]
    assert {t.experts[-1] for t in last_round} == {"copy", "weak"}
    assert not any(t.accepted for t in last_round)
    assert greedy_select(features, correct, names, max_experts=1).selected == ["merged"]


def test_selection_keeps_one_expert_when_a_second_never_helps():
    task, features = _separable()
    best = torch.ones(len(task))
    correct = torch.stack([best * 0.5 + 0.5 * (task == 0), best], 1)
    result = greedy_select(features, correct, ["partial", "everything"])
    assert result.selected == ["everything"] and len(result.trials) == 2


class _Task:
    """The parts of an lm-eval ConfigurableTask that :func:`restrict` reads."""

    def __init__(self, splits: dict[str, list[int]], test: str | None, validation: str | None):
        import datasets

        self.dataset = {
            k: datasets.Dataset.from_list([{"i": i} for i in v]) for k, v in splits.items()
        }
        self.config = type("C", (), {"test_split": test, "validation_split": validation})()

    def has_test_docs(self):
        return self.config.test_split is not None

    def has_validation_docs(self):
        return self.config.validation_split is not None

    def eval_docs(self):
        split = self.config.test_split or self.config.validation_split
        return [d["i"] for d in self.dataset[split]]


@pytest.mark.parametrize(
    "splits, test, validation",
    [
        ({"test": list(range(23)), "validation": list(range(100, 110))}, "test", "validation"),
        ({"test": list(range(23))}, "test", None),
        ({"validation": list(range(17))}, None, "validation"),
    ],
)
def test_proxy_and_test_documents_never_overlap(splits, test, validation):
    docs = {}
    for split in ("test", "proxy"):
        t = _Task(splits, test, validation)
        restrict(t, split)
        docs[split] = t.eval_docs()
    assert docs["test"] and docs["proxy"]
    assert not set(docs["test"]) & set(docs["proxy"])
    if test and validation:  # the validation split is the proxy; the test split is whole
        assert docs["test"] == splits["test"] and docs["proxy"] == splits["validation"]
    else:  # one split: one document in HOLDOUT_EVERY is held out, the rest is reported
        (only,) = splits.values()
        assert sorted(docs["test"] + docs["proxy"]) == only
        assert docs["proxy"] == only[::HOLDOUT_EVERY]


@pytest.mark.slow
def test_no_selection_document_appears_in_the_reported_evaluation(demo_zoo, tmp_path):
    """Through lm-eval: a demo task (validation split) and a user task with only a test
    split (held-out slice): the proxy's documents and the test's are disjoint."""
    from model_glue.evaluate import evaluate_samples

    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(12))
    )
    (tmp_path / "my_inc.yaml").write_text(
        "task: my_inc\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: t.jsonl}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\ntarget_delimiter: ''\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 3, do_sample: false}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    model = demo_zoo / "models" / "add-a"
    seen = {}
    for split in ("test", "proxy"):
        scores, rows = evaluate_samples(
            model, ["demo_add", "my_inc"], split=split, include_paths=[str(tmp_path)]
        )
        seen[split] = {(r["task"], r["context"]) for r in rows}
        described = {s.task: s.split for s in scores}
        if split == "test":
            assert described == {"demo_add": "test", "my_inc": "test without held-out 1/5"}
        else:
            assert described == {"demo_add": "validation", "my_inc": "test held-out 1/5"}
    assert seen["test"] and seen["proxy"] and not seen["test"] & seen["proxy"]
    assert len([c for t, c in seen["proxy"] if t == "my_inc"]) == 3  # documents 0, 5, 10


def _proxy_record(store, key: str, means: dict[str, float]) -> str:
    scores = [{"task": t, "metric": "exact_match", "value": v} for t, v in means.items()]
    store.put_json("record", key, {"scores": scores, "samples": []})
    return key


def test_the_final_choice_is_the_best_single_model_when_every_combination_is_worse(tmp_path):
    from storage import ArtifactStore
    from tasks.select import choose_final

    store = ArtifactStore(str(tmp_path / "store"))
    models = {
        "single-a": ("model", {"t1": 0.9, "t2": 0.5}),
        "single-b": ("model", {"t1": 0.1, "t2": 0.6}),
        "merge": ("merged", {"t1": 0.6, "t2": 0.6}),
        "mixture": ("mixture", {"t1": 0.7, "t2": 0.5}),
    }
    keys = {
        n: _proxy_record(store, f"{i:02d}" * 16, m) for i, (n, (_, m)) in enumerate(models.items())
    }
    candidates = [
        {"name": n, "artifact_id": f"id-{n}", "fingerprint": f"fp-{n}", "kind": k}
        for n, (k, _) in models.items()
    ]
    r = choose_final.fn(store_url=store.url, candidates=candidates, proxy_keys=keys)
    assert r["final"]["name"] == "single-a" and r["best_single"]["name"] == "single-a"
    assert [x["name"] for x in r["ranking"]][:2] == ["single-a", "merge"]
    # a tie goes to the simpler model: the mixture must beat the single model to be chosen
    models["mixture"] = ("mixture", {"t1": 0.9, "t2": 0.5})
    keys["mixture"] = _proxy_record(store, "ff" * 16, models["mixture"][1])
    r = choose_final.fn(store_url=store.url, candidates=candidates, proxy_keys=keys)
    assert r["final"]["name"] == "single-a"


def test_the_run_config_takes_the_linear_router_and_expert_bounds():
    from model_glue.config import ConfigError, parse_config

    base = {
        "zoo": [{"name": "a", "path": str(Path("/tmp"))}],
        "evaluation": {"tasks": ["demo_add"]},
    }
    cfg = parse_config(base | {"mixture": {"variant": "model_level", "max_experts": 3}})
    assert cfg.mixture.router_used() == "linear" and cfg.mixture.max_experts == 3
    with pytest.raises(ConfigError, match="linear"):
        parse_config(base | {"mixture": {"variant": "ffn_moe", "router": "linear"}})
    with pytest.raises(ConfigError, match="max_experts"):
        parse_config(base | {"mixture": {"variant": "model_level", "max_experts": 1}})


def _run(demo_zoo, tmp_path, families: dict[str, list[str]], **sections) -> dict:
    from flows.glue_recipe import run_config

    zoo = zoo_entries(demo_zoo / "models", families)
    return run_config(write_config(tmp_path / "glue.yaml", zoo, name="selection", **sections))


@pytest.mark.slow
def test_a_rejected_model_with_a_unique_skill_enters_the_mixture(
    demo_zoo, prefect_harness, tmp_path
):
    """The search, judged on demo_add only, rejects next-a from the family's merge; next-a
    is the only model that can do demo_next, so expert selection brings it back and the
    final model (the mixture) beats every single model on the test split."""
    summary = _run(
        demo_zoo,
        tmp_path,
        {"base-a": ["add-a", "next-a"]},
        evaluation={"tasks": ["demo_add", "demo_next"], "limit": 40},
        filter={"strategy": "average", "proxy_tasks": ["demo_add"], "proxy_limit": 30},
        mixture={"variant": "model_level", "layer": 2},
    )
    db = lineage(tmp_path / "lineage.duckdb")
    (meta,) = db.query("SELECT meta FROM artifacts WHERE kind = 'search'")["meta"].to_list()
    assert "next-a" in json.loads(meta)["rejected"]
    assert "next-a" in summary["mixture"]["experts"]
    steps = db.query(
        "SELECT coefficients, accepted FROM trials WHERE strategy = 'expert-selection' ORDER BY trial"
    )
    assert steps.height >= 2 and steps["accepted"][0]
    final = summary["final"]
    assert final["kind"] == "mixture" and final["gain"] > 0, final
    board = {r["name"]: r for r in summary["leaderboard"]}
    assert board[final["name"]]["final"] and sum(r["final"] for r in board.values()) == 1


@pytest.mark.slow
def test_the_guard_hands_over_a_single_model_when_the_combinations_are_worse(
    demo_zoo, prefect_harness, tmp_path
):
    """On demo_add alone, add-a is the best model; a task-arithmetic merge at lambda 2 and a
    random-router mixture of that merge with another family's base are worse, so the final
    model is add-a itself."""
    summary = _run(
        demo_zoo,
        tmp_path,
        {"base-a": ["add-a", "last-a"], "base-b": []},  # base-b: a 2nd cluster
        merge={"method": "task_arithmetic", "params": {"lambda": 2.0}},
        evaluation={"tasks": ["demo_add"], "limit": 40},
        mixture={"variant": "model_level", "router": "random", "layer": 2, "select_experts": False},
    )
    final = summary["final"]
    assert (final["name"], final["kind"]) == ("add-a", "model"), final
    assert final["gain"] == 0.0 and final["best_single"] == "add-a"
    board = {r["name"]: r for r in summary["leaderboard"]}
    assert {r["kind"] for r in board.values()} == {"model", "merged", "mixture"}
    assert board["add-a"]["final"]
