"""The lm-eval adapter: task files load offline from any cwd; scores match hand computation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_glue.env import configure_environment

configure_environment()

from model_glue.evaluate import DEMO_TASKS_DIR, Score, evaluate, task_manager  # noqa: E402

DEMO_TASKS = ["demo_add", "demo_next", "demo_last"]


def _demo_docs(task: str) -> list[dict]:
    skill = task.removeprefix("demo_")
    return [
        json.loads(line)
        for line in (DEMO_TASKS_DIR / f"demo_{skill}.jsonl").read_text().splitlines()
    ]


def _oracle_lm(answer_for):
    """An lm-eval LM that answers each prompt with ``answer_for(prompt)`` (no model at all)."""
    from lm_eval.api.model import LM

    class Oracle(LM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            return [answer_for(req.args[0]) for req in requests]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return Oracle()


@pytest.fixture(scope="module")
def tiny_model():
    from model_glue.zoo.recipe import ModelShape
    from model_glue.zoo.tokenizer import build_char_tokenizer
    from model_glue.zoo.train import new_model

    tok = build_char_tokenizer()
    model = new_model(
        ModelShape(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        tok,
        init_seed=3,
    )
    return model.eval(), tok


def _greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 4) -> list[str]:
    """Hand-computed greedy answers, one prompt at a time, cut at the first newline."""
    import torch

    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(max_new_tokens):
                next_id = model(input_ids=ids).logits[0, -1].argmax()
                if next_id.item() == tok.eos_token_id:
                    break
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        out.append(
            tok.decode(ids[0, -(ids.shape[1] - len(prompt)) :]).split("\n")[0]
            if ids.shape[1] > len(prompt)
            else ""
        )
    return out


@pytest.fixture(scope="module")
def echo_task_dir(tmp_path_factory, tiny_model) -> Path:
    """A task over 8 demo_add prompts whose targets are the tiny model's own greedy answers
    (hand-computed) for the first 4 docs and a wrong answer for the last 4: exact match 0.5."""
    model, tok = tiny_model
    folder = tmp_path_factory.mktemp("echo_task")
    prompts = [d["prompt"] for d in _demo_docs("demo_add")[:8]]
    answers = _greedy_answers(model, tok, prompts)
    rows = [
        {"prompt": p, "answer": a if i < 4 else a + "#"}
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    (folder / "echo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(DEMO_TASKS_DIR / "utils.py", folder / "utils.py")
    yaml_text = (DEMO_TASKS_DIR / "demo_add.yaml").read_text()
    yaml_text = (
        yaml_text.replace("task: demo_add", "task: echo_check")
        .replace("demo_add.jsonl", "echo.jsonl")
        .replace("demo_add_validation.jsonl", "echo.jsonl")  # proxy documents: unused here
        .replace("tag: demo", "tag: echo")
    )
    (folder / "echo_check.yaml").write_text(yaml_text)
    return folder


def test_demo_tasks_load_offline_from_another_cwd(tmp_path, monkeypatch, echo_task_dir):
    monkeypatch.chdir(tmp_path)
    tasks = task_manager((str(echo_task_dir),)).load(["demo"])["tasks"]
    assert sorted(tasks) == sorted(DEMO_TASKS)
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert len(docs) == len(_demo_docs(name)) == (150 if name == "demo_add" else 200)
        assert docs[0] == _demo_docs(name)[0]
        assert len(list(task.validation_docs())) == (50 if name == "demo_add" else 100)
        assert task.config.target_delimiter == ""
        assert task.config.generation_kwargs["until"] == ["\n"]
        assert task.config.generation_kwargs["max_gen_toks"] <= 8


def test_oracle_scores_one_and_wrong_answers_score_zero(echo_task_dir):
    answers = {d["prompt"]: d["answer"] for t in DEMO_TASKS for d in _demo_docs(t)}
    right = evaluate(
        _oracle_lm(lambda p: answers[p]), DEMO_TASKS, limit=20, include_paths=[str(echo_task_dir)]
    )
    assert [(s.task, s.metric, s.value, s.n_samples) for s in right] == [
        (t, "exact_match", 1.0, 20) for t in sorted(DEMO_TASKS)
    ]
    wrong = evaluate(
        _oracle_lm(lambda p: answers[p] + "0"),
        DEMO_TASKS,
        limit=20,
        include_paths=[str(echo_task_dir)],
    )
    assert [s.value for s in wrong] == [0.0, 0.0, 0.0]
    # every third answer right: 7 of the first 20 docs (0, 3, ..., 18)
    order = {d["prompt"]: i for i, d in enumerate(_demo_docs("demo_last"))}
    third = evaluate(
        _oracle_lm(lambda p: answers[p] if order[p] % 3 == 0 else "?"),
        ["demo_last"],
        limit=20,
        include_paths=[str(echo_task_dir)],
    )
    assert third[0].value == pytest.approx(7 / 20)
    assert third[0].stderr == pytest.approx((0.35 * 0.65 / 19) ** 0.5)


def test_in_memory_model_matches_hand_computed_exact_match(tiny_model, echo_task_dir):
    model, tok = tiny_model
    scores = evaluate(
        model, ["echo_check"], tokenizer=tok, include_paths=[str(echo_task_dir)], batch_size=3
    )
    assert len(scores) == 1
    s = scores[0]
    assert isinstance(s, Score) and type(s.value) is float and type(s.stderr) is float
    assert (s.task, s.metric, s.n_samples) == ("echo_check", "exact_match", 8)
    assert s.value == 0.5


def test_directory_model_gives_same_scores_as_in_memory(tiny_model, tmp_path, echo_task_dir):
    model, tok = tiny_model
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    from_dir = evaluate(
        tmp_path / "m", ["echo_check", "demo_next"], limit=10, include_paths=[str(echo_task_dir)]
    )
    in_memory = evaluate(
        model,
        ["echo_check", "demo_next"],
        tokenizer=tok,
        limit=10,
        include_paths=[str(echo_task_dir)],
    )
    assert from_dir == in_memory
    assert [(s.task, s.n_samples) for s in from_dir] == [("demo_next", 10), ("echo_check", 8)]


def test_bad_inputs_raise_clear_errors(tmp_path, tiny_model):
    from model_glue.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does-not-exist"):
        evaluate(tmp_path / "does-not-exist", ["demo_add"])
    model, _ = tiny_model
    with pytest.raises(ValueError, match="needs its tokenizer"):
        evaluate(model, ["demo_add"])
    with pytest.raises(ValueError, match="no tasks"):
        evaluate(model, [])
    from model_glue.evaluate import TaskError

    with pytest.raises(TaskError, match="task folder not found: .*nowhere"):
        evaluate(model, ["demo_add"], tokenizer=_, include_paths=[str(tmp_path / "nowhere")])


def test_scores_from_results_casts_numpy_and_skips_stderr_na():
    import numpy as np

    from model_glue.evaluate import scores_from_results

    results = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": np.float64(0.25),
                "acc_stderr,none": "N/A",
                "exact_match,strict": np.float32(0.5),
                "exact_match_stderr,strict": np.float64(0.1),
            }
        },
        "n-samples": {"t": {"original": 10, "effective": 4}},
    }
    scores = scores_from_results(results)
    assert scores == [
        Score("t", "acc", 0.25, None, 4),
        Score("t", "exact_match,strict", 0.5, pytest.approx(0.1), 4),
    ]
    assert all(type(s.value) is float for s in scores)
