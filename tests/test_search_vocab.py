"""The search over a cluster whose vocabularies differ: one fine-tune appended a special
token (one more embedding and lm_head row, one more token in its tokenizer).

Tiny float32 Llamas of 42 tokens (:func:`tests.factories.char_tokenizer`): a base and
three fine-tunes, ``a`` with ``<|im_start|>`` appended. Each trial of
:class:`~model_glue.search.proxy.ProxyScorer` (with ``tokenizer``) must be the merge the
pipeline writes for those coefficients (``tasks.merge.merge_spec``, then
``merge_to_directory``): same tensors, same tokenizer, same logits, same lm-eval score on a
loglikelihood task whose continuations hold the added token.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from model_glue.env import configure_environment

configure_environment()

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from model_glue.evaluate import DEMO_TASKS_DIR  # noqa: E402
from model_glue.search import TrialSpec  # noqa: E402
from model_glue.search.engine_params import engine_model_params  # noqa: E402
from model_glue.search.proxy import LmEvalProxy, ProxyScorer  # noqa: E402
from tests.factories import char_tokenizer, fine_tune, random_state, save_llama  # noqa: E402

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
IM = "<|im_start|>"
TASK = "vocab_ll"
# fingerprints: the final merge lists members by fingerprint, here c, a, b (not by name)
FINGERPRINTS = {"base": "f0", "a": "f2", "b": "f3", "c": "f1"}
ORDER = ["c", "a", "b"]


def tokenizer(extra: tuple[str, ...] = ()):
    tok = char_tokenizer()
    for e in extra:
        tok.add_special_tokens({"additional_special_tokens": [e]})
    return tok


def with_new_row(sd: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.cat([v, torch.randn(1, v.shape[1], generator=g)]) if k in (EMBED, HEAD) else v
        for k, v in sd.items()
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab-zoo")
    base = random_state(0, vocab=42)
    states = {
        "base": (base, ()),
        "a": (with_new_row(fine_tune(base, 1, scale=0.2), 11), (IM,)),
        "b": (fine_tune(base, 2, scale=0.2), ()),
        "c": (fine_tune(base, 3, scale=0.2), ()),
    }
    out = {}
    for name, (sd, extra) in states.items():
        save_llama(root / name, sd, vocab=sd[EMBED].shape[0], tokenizer=False)
        tokenizer(extra).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """A loglikelihood task (perplexity: a real number) whose answers hold ``IM``."""
    d = tmp_path_factory.mktemp("vocab-tasks")
    shutil.copy(DEMO_TASKS_DIR / "utils.py", d / "utils.py")
    rows = [{"prompt": f"{i}+{j}=", "answer": f"{IM}{i + j}"} for i in range(3) for j in range(3)]
    for name in ("ll.jsonl", "ll_validation.jsonl"):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "custom_dataset: !function utils.load_demo_split\n"
        "dataset_kwargs:\n  data_file: ll.jsonl\n  validation_file: ll_validation.jsonl\n"
        "test_split: test\nvalidation_split: validation\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
        "    higher_is_better: false\n"
    )
    return d


def members(zoo, names=("a", "b", "c")) -> list[dict]:
    return [{"name": n, "uri": str(zoo[n]), "fingerprint": FINGERPRINTS[n]} for n in names]


def base_ref(zoo) -> dict:
    return {"name": "base", "uri": str(zoo["base"]), "fingerprint": FINGERPRINTS["base"]}


def scorer_for(zoo, tasks_dir, tokenizer="union", *, base=True, limit=4) -> ProxyScorer:
    return ProxyScorer.from_checkpoints(
        {n: zoo[n] for n in ("a", "b", "c")},
        [TASK],
        limit=limit,
        base=zoo["base"] if base else None,
        include_paths=[str(tasks_dir)],
        tokenizer=tokenizer,
        order=ORDER,
        base_name="base",
    )


def written(zoo, tmp_path: Path, spec: TrialSpec, scorer, tokenizer, *, base=True) -> Path:
    """The merge stage's output for ``spec``'s members with the engine parameters of ``spec``."""
    from storage import ArtifactStore
    from tasks.merge import _merge

    params = engine_model_params(spec, scorer.layout)
    refs = [m | {"params": params[m["name"]]} for m in members(zoo, spec.models)]
    store = ArtifactStore(str(tmp_path / "store"))
    key = hashlib.sha256(repr((spec, tokenizer, base)).encode()).hexdigest()
    record = _merge(
        store, key, "trial", refs, spec.method, {}, None, base_ref(zoo) if base else None, tokenizer
    )
    return Path(record["path"])


def assert_same_model(scorer: ProxyScorer, out: Path) -> None:
    stored = load_file(out / "model.safetensors")
    own = scorer.model.state_dict()
    assert set(stored) <= set(own)
    for k, v in stored.items():
        assert torch.equal(own[k], v), k
    assert scorer.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert (
        scorer.model.config.vocab_size
        == json.loads((out / "config.json").read_text())["vocab_size"]
    )
    ids = torch.tensor([scorer.tokenizer(f"1+2={IM}3")["input_ids"]])
    written_model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.equal(scorer.model(ids).logits, written_model(ids).logits)


@pytest.mark.parametrize(
    ("tokenizer_setting", "spec", "rows"),
    [
        ("union", TrialSpec({"a": 0.6, "b": 0.3, "c": 0.5}, "task_arithmetic"), 43),
        ("union", TrialSpec({"b": 0.7, "c": 0.4}, "ties", {"b": 0.5, "c": 0.8}), 42),
        ("base", TrialSpec({"a": 0.6, "c": 0.5}, "task_arithmetic"), 42),
        ("a", TrialSpec({"a": 0.6, "b": 0.5}, "ties", {"a": 0.7, "b": 0.7}), 43),
        ("a", TrialSpec({"b": 0.6, "c": 0.5}, "task_arithmetic"), 42),  # a absent: union
    ],
)
def test_a_trial_is_the_merge_the_pipeline_writes(
    zoo, tasks_dir, tmp_path, tokenizer_setting, spec, rows
):
    scorer = scorer_for(zoo, tasks_dir, tokenizer_setting)
    assert scorer.vocabularies is not None
    scorer.merge_into_model(spec)
    assert scorer.model.get_input_embeddings().weight.shape[0] == rows
    assert_same_model(scorer, written(zoo, tmp_path, spec, scorer, tokenizer_setting))


def test_linear_trials_without_a_base_and_a_member_alone(zoo, tasks_dir, tmp_path):
    scorer = scorer_for(zoo, tasks_dir, base=False)
    spec = TrialSpec({"a": 0.2, "b": 0.5, "c": 0.3})
    scorer.merge_into_model(spec)
    assert_same_model(scorer, written(zoo, tmp_path, spec, scorer, "union", base=False))
    # one model: the member itself (a search that keeps one member leaves it as it is)
    scorer.merge_into_model(TrialSpec({"a": 1.0}))
    assert_same_model(scorer, zoo["a"])
    scorer.merge_into_model(TrialSpec({"b": 1.0}))
    assert_same_model(scorer, zoo["b"])


def test_the_proxy_score_is_the_written_merges(zoo, tasks_dir, tmp_path):
    scorer = scorer_for(zoo, tasks_dir)
    spec = TrialSpec({"a": 0.6, "b": 0.3, "c": 0.5}, "task_arithmetic")
    score = scorer(spec)
    out = written(zoo, tmp_path, spec, scorer, "union")
    proxy = LmEvalProxy(
        [TASK], AutoTokenizer.from_pretrained(str(out)), limit=4, include_paths=[str(tasks_dir)]
    )
    assert proxy(AutoModelForCausalLM.from_pretrained(str(out)).eval()) == score
    assert score != scorer(TrialSpec({"b": 0.6, "c": 0.5}, "task_arithmetic"))
    assert scorer.proxy.tokenizer is scorer.tokenizer and len(scorer.tokenizer) == 42
    assert scorer(spec) == score  # back to 43 rows and the union tokenizer
    assert len(scorer.tokenizer) == 43 and scorer.model.config.vocab_size == 43


def _written_score(zoo, tasks_dir, tmp_path, result: dict, method: str) -> float:
    """The proxy score of the merge the merge stage writes for a filter result."""
    from storage import ArtifactStore
    from tasks.merge import _merge

    params = {a["name"]: a["params"] for a in result["accepted"]}
    refs = [m | {"params": params[m["name"]]} for m in members(zoo, list(params))]
    store = ArtifactStore(str(tmp_path / "store"))
    out = _merge(store, "f1" * 8, "final", refs, method, {}, None, base_ref(zoo), "union")["path"]
    proxy = LmEvalProxy(
        [TASK], AutoTokenizer.from_pretrained(out), limit=4, include_paths=[str(tasks_dir)]
    )
    return proxy(AutoModelForCausalLM.from_pretrained(out).eval())


@pytest.mark.parametrize(
    "settings",
    [{"strategy": "coefficient", "grid": [0.3, 0.7]}, {"strategy": "evolutionary", "budget": 6}],
)
def test_the_filter_tasks_search_runs_and_its_best_is_what_is_written(
    zoo, tasks_dir, tmp_path, settings
):
    from tasks.filter import _filter

    result = _filter(
        None,
        "key",
        members(zoo),
        base_ref(zoo),
        "task_arithmetic",
        {},
        settings,
        [TASK],
        4,
        [str(tasks_dir)],
        tokenizer="union",
    )
    assert result["evaluations"] == len(result["trials"]) > 1
    accepted = sorted(a["name"] for a in result["accepted"])
    if len(accepted) == 3 or (len(accepted) > 1 and settings["strategy"] != "evolutionary"):
        # the best trial merged exactly the accepted members: its score is the written merge's
        assert (
            _written_score(zoo, tasks_dir, tmp_path, result, "task_arithmetic")
            == (result["best_score"])
        )


def test_members_of_one_vocabulary_are_scored_as_before(zoo, tasks_dir):
    def scorer(tokenizer):
        return ProxyScorer.from_checkpoints(
            {n: zoo[n] for n in ("b", "c")},
            [TASK],
            limit=4,
            base=zoo["base"],
            include_paths=[str(tasks_dir)],
            tokenizer=tokenizer,
        )

    before, now = scorer(None), scorer("union")
    assert now.vocabularies is None  # every input has the merged vocabulary already
    spec = TrialSpec({"b": 0.6, "c": 0.5}, "task_arithmetic")
    assert before(spec) == now(spec)
    assert all(
        torch.equal(v, now.model.state_dict()[k]) for k, v in before.model.state_dict().items()
    )
    assert (
        now.tokenizer is None
        and now.proxy.tokenizer.get_vocab() == before.proxy.tokenizer.get_vocab()
    )


def test_without_tokenizer_different_vocabularies_are_refused(zoo, tasks_dir):
    from model_glue.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"tensor .*\(42, 32\), .a. has \(43, 32\)"):
        scorer_for(zoo, tasks_dir, None)
