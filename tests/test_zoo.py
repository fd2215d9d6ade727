"""The demo zoo builder: tiny recipes in tmp folders (seconds), plus one slow check of the
full zoo's skills."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from model_glue.env import configure_environment

configure_environment()

from model_glue.zoo import (  # noqa: E402
    ZOO_RECIPE,
    BaseModel,
    FineTune,
    ModelShape,
    Schedule,
    ZooRecipe,
    build_demo_zoo,
    builder,  # noqa: E402
    is_current,
    recipe_hash,
)
from model_glue.zoo.eval_sets import LM_TASKS_DIR, eval_set_lines  # noqa: E402
from model_glue.zoo.skills import SKILLS, is_eval_word  # noqa: E402

_TINY_SCHEDULE = Schedule(steps=6, lr=3e-3, batch_size=4, seq_len=32, warmup_steps=2)
TINY = ZooRecipe(
    shape=ModelShape(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    bases=(
        BaseModel(
            "base-a",
            init_seed=1,
            data_seed=1,
            schedule=_TINY_SCHEDULE,
            skill_mix=0.2,
            half_skills=True,
        ),
        BaseModel("base-b", init_seed=2, data_seed=2, schedule=_TINY_SCHEDULE, skill_mix=0.2),
    ),
    fine_tunes=(
        FineTune(
            "add-a",
            "base-a",
            ("add",),
            data_seed=3,
            schedule=dataclasses.replace(_TINY_SCHEDULE, lr=1e-3),
            replay=0.5,
        ),
    ),
)


def _weights(zoo: Path) -> dict[str, bytes]:
    return {
        p.parent.name: p.read_bytes() for p in sorted((zoo / "models").glob("*/model.safetensors"))
    }


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    return build_demo_zoo(tmp_path_factory.mktemp("zoo") / "zoo", recipe=TINY)


def test_tiny_zoo_reloads_as_llama_checkpoints(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    for name in ("base-a", "base-b", "add-a"):
        path = tiny_zoo / "models" / name
        assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert isinstance(model, LlamaForCausalLM)
        assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
        assert model.config.tie_word_embeddings is False
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert all(p.dtype.is_floating_point and p.itemsize == 4 for p in model.parameters())
        assert model.config.vocab_size == len(tok)
        assert tok.decode(tok("next abc=d\n")["input_ids"]) == "next abc=d\n"
        assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
        assert tok.bos_token is None and not getattr(tok, "chat_template", None)


def test_full_recipe_model_shape_has_about_1_1m_parameters():
    from model_glue.zoo.tokenizer import build_char_tokenizer
    from model_glue.zoo.train import new_model

    model = new_model(ZOO_RECIPE.shape, build_char_tokenizer(), init_seed=0)
    n = sum(p.numel() for p in model.parameters())
    # embeddings 2 * 99 * 128 + 4 layers * (4 * 128^2 + 3 * 128 * 512 + 2 * 128) + final norm 128
    assert n == 2 * 99 * 128 + 4 * (4 * 128 * 128 + 3 * 128 * 512 + 2 * 128) + 128 == 1_075_072


def test_glue_yaml_lists_the_zoo_and_validates(tiny_zoo):
    import yaml

    data = yaml.safe_load((tiny_zoo / "glue.yaml").read_text())
    assert data["name"] == "demo"
    assert data["zoo"] == [
        {"name": "base-a", "path": "models/base-a"},
        {"name": "base-b", "path": "models/base-b"},
        {"name": "add-a", "path": "models/add-a", "base": "base-a"},
    ]
    assert data["similarity"]["tensors"] == ["attn", "mlp"]
    assert data["merge"] == {"method": "ties", "params": {"density": 0.5}}
    assert data["mixture"]["router"] == "linear"
    assert data["evaluation"] == {"tasks": ["demo_add", "demo_next", "demo_last"], "limit": None}
    # threshold auto: the gap it finds lies between the families' measured similarities
    from model_glue.clustering import auto_threshold
    from model_glue.zoo.config_file import measured_similarity

    assert data["similarity"]["threshold"] == "auto"
    within, across = measured_similarity(tiny_zoo, TINY)
    assert len(within) == 1 and len(across) == 2
    assert max(across) < auto_threshold(within + across).threshold < min(within)
    from model_glue.config import load_config

    assert [m.name for m in load_config(tiny_zoo / "glue.yaml").zoo] == [
        "base-a",
        "base-b",
        "add-a",
    ]


def test_lock_records_the_recipe_hash(tiny_zoo):
    lock = json.loads((tiny_zoo / "zoo.lock.json").read_text())
    assert lock["recipe_hash"] == recipe_hash(TINY)
    assert set(lock["models"]) == {"base-a", "base-b", "add-a"}
    assert lock["models"]["add-a"]["base"] == "base-a"


def test_two_builds_give_identical_bytes(tiny_zoo, tmp_path):
    again = build_demo_zoo(tmp_path / "zoo", recipe=TINY)
    assert _weights(again) == _weights(tiny_zoo)
    assert (again / "glue.yaml").read_text() == (tiny_zoo / "glue.yaml").read_text()


def test_cached_zoo_is_returned_without_training(tiny_zoo, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached zoo was retrained")

    monkeypatch.setattr(builder, "_train_all", no_training)
    assert build_demo_zoo(tiny_zoo, recipe=TINY) == tiny_zoo


def test_changed_recipe_rebuilds(tiny_zoo, tmp_path):
    import shutil

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    changed = dataclasses.replace(
        TINY, fine_tunes=(dataclasses.replace(TINY.fine_tunes[0], data_seed=4),)
    )
    assert recipe_hash(changed) != recipe_hash(TINY)
    assert not is_current(zoo, changed)
    build_demo_zoo(zoo, recipe=changed)
    old, new = _weights(tiny_zoo), _weights(zoo)
    assert new["base-a"] == old["base-a"] and new["add-a"] != old["add-a"]
    assert json.loads((zoo / "zoo.lock.json").read_text())["recipe_hash"] == recipe_hash(changed)
    assert not list(tmp_path.glob(".zoo.*"))  # no temporary folders left behind


def test_missing_model_dir_rebuilds(tiny_zoo, tmp_path):
    import shutil

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    shutil.rmtree(zoo / "models" / "add-a")
    assert not is_current(zoo, TINY)
    build_demo_zoo(zoo, recipe=TINY)
    assert _weights(zoo) == _weights(tiny_zoo)


def test_crash_mid_build_leaves_the_old_zoo_and_no_complete_looking_folder(
    tiny_zoo, tmp_path, monkeypatch
):
    import shutil

    from model_glue.zoo import train

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash during a fine-tune")

    monkeypatch.setattr(train, "fine_tune", crash)
    changed = dataclasses.replace(
        TINY, fine_tunes=(dataclasses.replace(TINY.fine_tunes[0], data_seed=5),)
    )
    with pytest.raises(KeyboardInterrupt):
        build_demo_zoo(zoo, recipe=changed)
    assert is_current(zoo, TINY) and not is_current(zoo, changed)
    assert _weights(zoo) == _weights(tiny_zoo)
    assert not list(tmp_path.glob(".zoo.*"))


def test_recipe_hash_tracks_every_hyperparameter():
    h = recipe_hash(ZOO_RECIPE)
    assert h == recipe_hash(ZOO_RECIPE) and len(h) == 64
    base = ZOO_RECIPE.bases[0]
    tweaks = [
        dataclasses.replace(
            ZOO_RECIPE, shape=dataclasses.replace(ZOO_RECIPE.shape, intermediate_size=256)
        ),
        dataclasses.replace(
            ZOO_RECIPE, bases=(dataclasses.replace(base, skill_mix=0.11),) + ZOO_RECIPE.bases[1:]
        ),
        dataclasses.replace(
            ZOO_RECIPE,
            bases=(dataclasses.replace(base, schedule=dataclasses.replace(base.schedule, lr=1e-3)),)
            + ZOO_RECIPE.bases[1:],
        ),
        dataclasses.replace(ZOO_RECIPE, fine_tunes=ZOO_RECIPE.fine_tunes[:-1]),
    ]
    assert len({recipe_hash(r) for r in tweaks} | {h}) == len(tweaks) + 1


def test_recipe_rejects_unknown_base_and_duplicate_names():
    with pytest.raises(ValueError, match="unknown base 'base-z'"):
        dataclasses.replace(
            TINY, fine_tunes=(dataclasses.replace(TINY.fine_tunes[0], base="base-z"),)
        )
    with pytest.raises(ValueError, match="duplicate model names"):
        dataclasses.replace(
            TINY, fine_tunes=(dataclasses.replace(TINY.fine_tunes[0], name="base-b"),)
        )


def test_demo_zoo_recipe_has_every_kind_of_model_the_method_needs():
    fts = {ft.name: ft for ft in ZOO_RECIPE.fine_tunes}
    assert {b.name for b in ZOO_RECIPE.bases} == {"base-a", "base-b"}
    assert ZOO_RECIPE.bases[0].init_seed != ZOO_RECIPE.bases[1].init_seed
    same_skill = [
        ft
        for ft in fts.values()
        if ft.base == "base-a" and ft.skills == ("add",) and not ft.corrupt
    ]
    assert len({ft.data_seed for ft in same_skill}) >= 2  # model-soup candidates
    assert any(ft.corrupt and ft.base == "base-a" for ft in fts.values())  # a detrimental model
    assert any(ft.base == "base-b" for ft in fts.values())
    # v4: a base that knows half of each skill, fine-tunes that replay its data
    assert ZOO_RECIPE.bases[0].half_skills and all(ft.replay > 0 for ft in fts.values())


def test_each_fine_tune_subset_keeps_its_own_three_quarters_of_the_prompts():
    from model_glue.zoo.train import in_subset

    space = [f"{a}+{b}=" for a in range(20) for b in range(10)]
    kept = {seed: {p for p in space if in_subset(p, seed)} for seed in (101, 102)}
    for seed, prompts in kept.items():
        assert 0.65 <= len(prompts) / len(space) <= 0.85, seed
    assert kept[101] != kept[102] and len(kept[101] | kept[102]) > len(kept[101])


def test_half_skills_split_each_prompt_space_in_two():
    rng = random.Random(3)
    for skill in SKILLS.values():
        drawn = [skill.sample(rng, "train") for _ in range(4000)]
        share = sum(map(skill.in_half, drawn)) / len(drawn)
        assert 0.4 <= share <= 0.6, (skill.name, share)
        assert all(
            skill.in_half(skill.sample_where(rng, "train", skill.in_half)) for _ in range(200)
        )


def test_shipped_test_and_validation_sets_equal_the_skill_rules_and_never_overlap():
    for skill in SKILLS:
        shipped = {}
        for split, name in (("test", f"demo_{skill}"), ("validation", f"demo_{skill}_validation")):
            shipped[split] = (LM_TASKS_DIR / f"{name}.jsonl").read_text().splitlines()
            assert shipped[split] == eval_set_lines(skill, split), (
                f"regenerate with python -m model_glue.zoo.eval_sets ({skill} {split})"
            )
            assert len(set(shipped[split])) == len(shipped[split])
        prompts = {k: {json.loads(x)["prompt"] for x in v} for k, v in shipped.items()}
        assert not prompts["test"] & prompts["validation"]
        assert len(shipped["test"]) == (150 if skill == "add" else 200)
        assert len(shipped["validation"]) == (50 if skill == "add" else 100)


def test_answers_follow_the_rules():
    rows = {skill: [json.loads(line) for line in eval_set_lines(skill)[:3]] for skill in SKILLS}
    for row in rows["add"]:
        a, b = row["prompt"].rstrip("=").split("+")
        assert row["answer"] == str(int(a) + int(b))
    for row in rows["last"]:
        assert row["answer"] == row["prompt"][-2]
    for row in rows["next"]:
        assert ord(row["answer"]) - ord(row["prompt"][-2]) in (1, -25)
    ex = SKILLS["add"].sample(random.Random(0), "train")
    assert SKILLS["add"].corrupt(ex) == str(int(ex.answer) + 1)


def test_word_prompts_never_seen_in_training():
    for skill in ("next", "last"):
        test_prompts = {json.loads(line)["prompt"] for line in eval_set_lines(skill)}
        assert all(is_eval_word(p.split(" ")[1].rstrip("=")) for p in test_prompts)
        rng = random.Random(7)
        train_prompts = {SKILLS[skill].sample(rng, "train").prompt for _ in range(5000)}
        assert not (train_prompts & test_prompts)
        assert not any(is_eval_word(p.split(" ")[1].rstrip("=")) for p in train_prompts)


@pytest.mark.slow
def test_demo_zoo_experts_learned_their_skills_and_kept_the_bases(demo_zoo):
    """Zoo v4: base-a knows about half of each skill; each expert completes its own and
    keeps what the base knows (replay), so a merge of the specialists beats each of them;
    the detrimental model drags a merge it joins far below the expert alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_glue.evaluate import evaluate

    tasks = ["demo_add", "demo_next", "demo_last"]

    def acc(model, tok=None) -> dict[str, float]:
        return {s.task: s.value for s in evaluate(model, tasks, tokenizer=tok, limit=100)}

    def mean(scores: dict[str, float]) -> float:
        return sum(scores.values()) / len(scores)

    models = demo_zoo / "models"
    names = ("base-a", "add-a", "next-a", "last-a", "noisy-a")
    zoo = {name: acc(models / name) for name in names}
    own = {"add-a": "demo_add", "next-a": "demo_next", "last-a": "demo_last"}
    for expert, task in own.items():
        assert zoo[expert][task] >= (0.8 if task == "demo_add" else 0.9), (expert, zoo[expert])
        for other in set(tasks) - {task}:
            assert zoo[expert][other] >= zoo["base-a"][other] - 0.15, (expert, zoo[expert])
    for task in tasks:
        assert 0.3 <= zoo["base-a"][task] <= 0.7 and zoo["noisy-a"][task] <= 0.4
    tok = AutoTokenizer.from_pretrained(models / "add-a")
    states = {n: AutoModelForCausalLM.from_pretrained(models / n).state_dict() for n in names}
    merged = AutoModelForCausalLM.from_pretrained(models / "base-a")
    base = states["base-a"]
    merged.load_state_dict(
        {k: v + 0.5 * sum(states[e][k] - v for e in own) for k, v in base.items()}
    )
    assert mean(acc(merged, tok)) > max(mean(zoo[e]) for e in own)
    noisy = AutoModelForCausalLM.from_pretrained(models / "add-a")
    noisy.load_state_dict({k: (v + states["noisy-a"][k]) / 2 for k, v in states["add-a"].items()})
    assert acc(noisy, tok)["demo_add"] <= zoo["add-a"]["demo_add"] - 0.3
