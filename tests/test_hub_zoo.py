"""A zoo as the hub has it, run as a stranger runs it: ``glue run`` in a subprocess against
a local stand-in for the hub (``HF_ENDPOINT``), then a nightly refresh.

The hub serves a tiny Llama base, a fine-tune of it named in the zoo, and, found by
``zoo_from`` (the base's model tree): a fine-tune that added a token (its embedding and
head one row longer), a LoRA adapter of the base and an unrelated model. Then the named
fine-tune gets a new commit and a new fine-tune is published: ``glue plan`` names both,
the rerun recomputes only what depends on them and downloads nothing else; offline, the
run answers from the cache alone.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from tests.factories import char_tokenizer, glue_run_as_user, lineage, save_tiny_llama
from tests.hub_stub import HubStub, read_dir

pytestmark = [pytest.mark.slow]

HIDDEN = {"hidden": 16, "layers": 2, "heads": 2}
TOKEN = "hf_s3cretT0ken"  # the user's token for the private repo: never written anywhere


def _added_token(base: Path, path: Path, seed: int) -> Path:
    """A fine-tune of ``base`` that added the token ``!``: one more embedding and head
    row (distinct values), its tokenizer one token longer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=g))
    model.resize_token_embeddings(model.config.vocab_size + 1)
    with torch.no_grad():
        model.get_input_embeddings().weight[-1] = 0.5
        model.get_output_embeddings().weight[-1] = -0.5
    model.save_pretrained(path)
    char_tokenizer(extra="!").save_pretrained(path)
    return path


def _lora(base: Path, path: Path, seed: int) -> Path:
    """A PEFT LoRA adapter of ``base`` (lora_B made non-zero), naming ``org/base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": "org/base"})
    )
    return path


def _tasks(folder: Path) -> None:
    (folder / "data").mkdir(parents=True)
    rng = random.Random(0)
    with (folder / "data" / "sums.jsonl").open("w") as f:
        for _ in range(10):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            f.write(json.dumps({"q": f"{a}+{b}=", "a": str(a + b)}) + "\n")
    (folder / "my_sums.yaml").write_text(
        "task: my_sums\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: data/sums.jsonl}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\ntarget_delimiter: ''\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 2, do_sample: false}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    made = tmp_path_factory.mktemp("published")
    tok = char_tokenizer()
    base = save_tiny_llama(made / "base", seed=0, vocab=len(tok), tokenizer=tok, **HIDDEN)
    models = {
        "org/base": base,
        "org/ft-a": save_tiny_llama(made / "ft-a", seed=1, base=base, tokenizer=tok),
        "org/ft-b": _added_token(base, made / "ft-b", seed=2),
        "org/lora": _lora(base, made / "lora", seed=3),
        "org/far": save_tiny_llama(made / "far", seed=9, vocab=len(tok), tokenizer=tok, **HIDDEN),
        "org/ft-c": save_tiny_llama(made / "ft-c", seed=4, base=base, tokenizer=tok),
        "org/ft-a2": save_tiny_llama(made / "ft-a2", seed=5, base=base, tokenizer=tok),
        "org/secret": save_tiny_llama(made / "secret", seed=6, base=base, tokenizer=tok),
    }
    with HubStub() as stub:
        stub.add_repo("org/base", base, downloads=100)
        relations = {"org/ft-a": 50, "org/ft-b": 40, "org/lora": 30, "org/far": 20}
        for repo, downloads in relations.items():
            relation = "adapter" if repo == "org/lora" else "finetune"
            stub.add_repo(
                repo, models[repo], base_model="org/base", relation=relation, downloads=downloads
            )
        stub.add_repo("org/secret", models["org/secret"], private=True, tokens=[TOKEN])
        stub.models = models
        yield stub


@pytest.fixture(scope="module")
def project(hub, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stranger") / "project"
    _tasks(root / "tasks")
    config = {
        "name": "hubzoo",
        "store": "state/store",
        "lineage_db": "state/lineage.duckdb",
        "hub_cache": "state/hub",
        "zoo": [
            {"name": "base", "repo": "org/base"},
            {"name": "ft-a", "repo": "org/ft-a", "revision": "main", "base": "base"},
            {"name": "secret", "repo": "org/secret", "base": "base"},
            {"name": "ghost", "repo": "org/ghost"},
        ],
        "zoo_from": {"base_model": "org/base", "limit": 10},
        "similarity": {"threshold": 0.5},
        "merge": {"method": "linear"},
        "evaluation": {"tasks": ["my_sums"], "limit": 4, "include_paths": ["tasks"]},
    }
    (root / "glue.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def _glue(project: Path, hub: HubStub, tmp: Path, command: str = "run", offline: bool = False):
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "1" if offline else None,
        "HF_TOKEN": TOKEN,
    }
    proc = glue_run_as_user(
        project / "glue.yaml", cwd=tmp, home=project / "home", env=env, command=command
    )
    out = proc.stdout + proc.stderr
    (project / f"glue-{command.replace(' ', '-')}.log").write_text(out)
    return proc.returncode, out


def _clusters(db) -> list[list[str]]:
    rows = db.query(
        "SELECT c.clustering_id, c.cluster, list(m.name ORDER BY m.name) AS names FROM clusters c "
        "JOIN models m ON m.fingerprint = c.model_fingerprint "
        "WHERE c.clustering_id = (SELECT r.cache_key FROM runs r WHERE r.stage = 'cluster' "
        "ORDER BY r.started_at DESC LIMIT 1) GROUP BY ALL"
    )
    return sorted(rows["names"].to_list())


@pytest.fixture(scope="module")
def first_run(project, hub, tmp_path_factory):
    rc, out = _glue(project, hub, tmp_path_factory.mktemp("cwd1"))
    return rc, out


def test_a_hub_zoo_with_discovery_an_added_token_and_an_adapter_merges_as_one_family(
    first_run, project
):
    rc, out = first_run
    assert rc == 0, out[-4000:]
    assert "Traceback" not in out
    assert "zoo_from org/base: 4 repos on the hub" in out, out[-3000:]
    db = lineage(project / "state" / "lineage.duckdb")
    family = ["base", "ft-a", "org--ft-b", "org--lora", "secret"]
    assert _clusters(db) == [family, ["org--far"]], out[-3000:]
    ghost = [line for line in out.splitlines() if line.strip().startswith("left out ghost:")]
    assert len(ghost) == 1 and "org/ghost" in ghost[0], out[-3000:]
    sources = dict(
        db.query("SELECT name, source FROM model_sources GROUP BY name, source").iter_rows()
    )
    assert sources == {
        "base": "hub", "ft-a": "hub", "org--ft-b": "hub", "org--far": "hub",
        "org--lora": "adapter", "secret": "hub",
    }  # fmt: skip
    adapted = db.query(
        "SELECT e.role FROM artifacts a JOIN edges e ON e.child_id = a.artifact_id "
        "WHERE a.kind = 'adapted' ORDER BY e.role"
    )["role"].to_list()
    assert adapted == ["adapter", "base"]
    listed = db.query("SELECT repo FROM discoveries ORDER BY rank")["repo"].to_list()
    assert listed == ["org/ft-a", "org/ft-b", "org/lora", "org/far"]


def test_the_adapter_member_is_pefts_merge_and_unload(first_run, project, hub):
    """The checkpoint the adapter stage stored, keyed on the adapter's and its base's
    fingerprints, holds the weights PEFT's own merge gives."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    db = lineage(project / "state" / "lineage.duckdb")
    uri = db.query("SELECT uri FROM artifacts WHERE kind = 'adapted'")["uri"].to_list()
    assert len(uri) == 1
    stored = {}
    for f in Path(uri[0].removeprefix("file://")).glob("*.safetensors"):
        stored |= load_file(f)
    base = AutoModelForCausalLM.from_pretrained(hub.models["org/base"])
    merged = PeftModel.from_pretrained(base, hub.models["org/lora"]).merge_and_unload()
    expected = merged.state_dict()
    assert sorted(stored) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(stored[name], value), name


def test_the_token_is_never_written(first_run, project):
    assert first_run[0] == 0
    assert TOKEN not in first_run[1]
    for path in project.rglob("*"):
        if path.is_file() and "hub" not in path.relative_to(project).parts[:2]:
            assert TOKEN.encode() not in path.read_bytes(), path


def test_the_merged_vocabulary_is_the_union_and_the_new_token_row_is_its_owners(
    first_run, project, hub
):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    db = lineage(project / "state" / "lineage.duckdb")
    path = db.query("SELECT uri FROM artifacts WHERE kind = 'merged'")["uri"].to_list()
    assert len(path) == 1
    merged = Path(path[0].removeprefix("file://"))
    tok = AutoTokenizer.from_pretrained(merged)
    owner = AutoTokenizer.from_pretrained(hub.models["org/ft-b"])
    assert len(tok) == len(owner) and tok.convert_tokens_to_ids("!") == len(owner) - 1
    weights = {}
    for f in merged.glob("*.safetensors"):
        weights |= load_file(f)
    own = load_file(hub.models["org/ft-b"] / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert weights[name].shape[0] == len(owner)
        torch.testing.assert_close(weights[name][-1], own[name][-1].to(weights[name].dtype))


def test_a_nightly_refresh_follows_a_new_commit_and_a_new_fine_tune(
    first_run, project, hub, tmp_path
):
    assert first_run[0] == 0
    commit = hub.push("org/ft-a", read_dir(hub.models["org/ft-a2"]))
    hub.add_repo(
        "org/ft-c", hub.models["org/ft-c"], base_model="org/base", relation="finetune", downloads=5
    )
    hub.reset_requests()
    rc, out = _glue(project, hub, tmp_path, command="plan")
    assert rc == 0, out[-3000:]
    assert f"new revision {commit[:7]} on the hub" in out, out[-3000:]
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in out.splitlines()]
    fingerprints = {r[1]: (r[2], r[3]) for r in rows if len(r) > 3 and r[0] == "fingerprint"}
    assert fingerprints["org--ft-c"] == ("stale", "new model"), out[-3000:]
    discovered = {r[1]: (r[2], r[3]) for r in rows if len(r) > 3 and r[0] == "discover"}
    assert discovered["org/base"] == ("stale", "the hub lists +org/ft-c"), out[-3000:]
    assert fingerprints["ft-a"] == ("stale", f"new revision {commit[:7]} on the hub")
    fresh = ("base", "org--ft-b", "org--far", "org--lora", "secret")
    assert all(fingerprints[n][0] == "fresh" for n in fresh), fingerprints
    assert hub.file_gets() == []  # planning downloads nothing

    rc, out = _glue(project, hub, tmp_path)
    assert rc == 0, out[-4000:]
    fetched = {r: hub.file_gets(r) for r in ("org/base", "org/ft-a", "org/ft-b", "org/ft-c")}
    assert fetched["org/base"] == fetched["org/ft-b"] == [], fetched  # unchanged: no download
    assert "model.safetensors" in fetched["org/ft-a"] and fetched["org/ft-c"], fetched
    db = lineage(project / "state" / "lineage.duckdb")
    last = db.query(
        "SELECT label, status FROM runs WHERE stage = 'fingerprint' AND flow_run_id = "
        "(SELECT flow_run_id FROM flow_runs ORDER BY started_at DESC LIMIT 1) ORDER BY label"
    )
    status = dict(last.iter_rows())
    assert status["ft-a"] == "completed" and status["org--ft-c"] == "completed", status
    assert {status[n] for n in ("base", "org--ft-b", "org--far", "org--lora", "secret")} <= {
        "cached", "reused"
    }, status  # fmt: skip
    assert ["base", "ft-a", "org--ft-b", "org--ft-c", "org--lora", "secret"] in _clusters(db)


def test_offline_the_run_answers_from_the_cache(first_run, project, hub, tmp_path):
    assert first_run[0] == 0
    config = yaml.safe_load((project / "glue.yaml").read_text())
    offline = project / "offline.yaml"
    offline.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "zoo_from"}))
    hub.reset_requests()
    proc = glue_run_as_user(
        offline, cwd=tmp_path, home=project / "home", env={"HF_ENDPOINT": hub.endpoint}
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert hub.count() == 0


def test_a_new_base_revision_makes_the_adapter_wait_on_it_in_the_plan(
    first_run, project, hub, tmp_path
):
    """(Last: it moves the base.) The adapter's stand-in carries no fingerprint yet."""
    assert first_run[0] == 0
    commit = hub.push("org/base", read_dir(hub.models["org/far"]))
    rc, out = _glue(project, hub, tmp_path, command="plan")
    assert rc == 0, out[-3000:]
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in out.splitlines()]
    calls = {(r[0], r[1]): (r[2], r[3]) for r in rows if len(r) > 3 and r[0]}
    assert calls[("fingerprint", "base")] == ("stale", f"new revision {commit[:7]} on the hub")
    assert calls[("adapter", "org--lora")] == ("stale", "waits on fingerprint of base")


def test_offline_without_the_cache_the_plan_says_what_cannot_be_resolved(project, hub, tmp_path):
    config = yaml.safe_load((project / "glue.yaml").read_text())
    empty = project / "empty-cache.yaml"
    empty.write_text(yaml.safe_dump(config | {"hub_cache": "state/nothing-here"}))
    proc = glue_run_as_user(
        empty, cwd=tmp_path, home=project / "home", env={"HF_ENDPOINT": hub.endpoint},
        command="plan",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in out.splitlines()]
    reasons = {(r[0], r[1]): r[3] for r in rows if len(r) > 3 and r[0]}
    assert reasons[("fingerprint", "base")].startswith("fails: org/base@main: offline mode")
    assert reasons[("discover", "org/base")].startswith("fails: skipped: discover org/base")
