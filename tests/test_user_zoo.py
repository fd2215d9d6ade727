"""First contact: a user's own zoo and lm-eval task files, outside the repository.

Everything a stranger would do from the README: a folder with the zoo, a task folder
beside the config whose YAMLs name their data files relative to themselves, relative
paths everywhere, one broken checkpoint, and ``glue run CONFIG`` in a subprocess started
from another working directory. The demo zoo's trained models are copied in under the
user's own names; the tasks are the user's, not the demo's.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from tests.factories import glue_run_as_user, lineage, write_config, zoo_entries

pytestmark = [pytest.mark.slow]

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{q}}}}"
target_delimiter: ""
"""
GENERATE = """doc_to_target: "{{a}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 3, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""
# two metrics: a search on it must be told which one (filter.proxy_metric)
CHOICE = """doc_to_choice: ["0", "1", "2", "3", "4", "5", "6", "7", "8"]
doc_to_target: "{{a | int}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""


def _write_tasks(folder: Path) -> None:
    folder.mkdir(parents=True)
    data = folder / "data"
    data.mkdir()
    rng = random.Random(3)
    with (data / "sums.jsonl").open("w") as f:
        for _ in range(40):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            f.write(json.dumps({"q": f"{a}+{b}=", "a": str(a + b)}) + "\n")
    words = ["hello", "world", "model", "merge", "tensor", "zebra", "apple", "river"]
    with (data / "words.jsonl").open("w") as f:
        for _ in range(40):
            w = rng.choice(words) + rng.choice("abcdefgh")
            f.write(json.dumps({"q": f"last {w}=", "a": w[-1]}) + "\n")
    for name, data_file, kind, body in (
        ("my_sums", "data/sums.jsonl", "generate_until", GENERATE),
        ("my_last_letter", "data/words.jsonl", "generate_until", GENERATE),
        ("my_sums_choice", "data/sums.jsonl", "multiple_choice", CHOICE),
    ):
        text = TASK.format(name=name, data=data_file, output_type=kind) + body
        (folder / f"{name}.yaml").write_text(text)


@pytest.fixture(scope="module")
def user_dir(demo_zoo, tmp_path_factory) -> Path:
    """``project/`` with ``glue.yaml``, ``models/`` (one truncated) and ``tasks/``."""
    root = tmp_path_factory.mktemp("stranger") / "project"
    src = demo_zoo / "models"
    for mine, theirs in (
        ("llama-base", "base-a"),
        ("llama-sums", "add-a"),
        ("llama-last", "last-a"),
        ("other-base", "base-b"),
        ("other-sums", "add-b"),
        ("broken", "next-a"),
    ):
        shutil.copytree(src / theirs, root / "models" / mine)
    weights = root / "models" / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    _write_tasks(root / "tasks")
    zoo = zoo_entries(
        "models", {"llama-base": ["llama-sums", "llama-last"], "other-base": ["other-sums"]}
    )
    zoo.append({"name": "broken", "path": "models/broken", "base": "llama-base"})
    write_config(
        root / "glue.yaml",
        zoo,
        name="mine",
        store="state/store",
        lineage_db="state/lineage.duckdb",
        # CMA-ES always merges every member: the search and the merge both run
        filter={"strategy": "evolutionary", "budget": 3, "proxy_limit": 10},
        merge={"method": "linear"},
        evaluation={
            "tasks": ["my_sums", "my_last_letter"],
            "limit": 15,
            "include_paths": ["tasks"],
        },
        # one expert per cluster, as the paper (expert selection has its own tests)
        mixture={
            "variant": "model_level",
            "router": "random",
            "layer": 2,
            "select_experts": False,
        },
    )
    return root


def _variant(user_dir: Path, name: str, **changes) -> Path:
    config = yaml.safe_load((user_dir / "glue.yaml").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            config[section] = {**config[section], key: value}
        else:
            config[section] = value
    path = user_dir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_users_zoo_and_tasks_run_the_whole_recipe(user_dir, tmp_path):
    proc = glue_run_as_user(user_dir / "glue.yaml", cwd=tmp_path, home=tmp_path / "home")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the broken model: its reason printed once, on one line, and no traceback anywhere
    reason = [line for line in out.splitlines() if "truncated safetensors file" in line]
    assert len(reason) == 1 and "broken" in reason[0], out[-4000:]
    assert "Traceback" not in out and "fatal:" not in out, out[-4000:]
    assert "left out (unreadable, see above): broken" in out

    db = lineage(user_dir / "state" / "lineage.duckdb")  # relative to the config, not the cwd
    done = dict(
        db.query(
            "SELECT stage, count(*) FROM runs WHERE status = 'completed' GROUP BY stage"
        ).iter_rows()
    )
    assert done["filter"] == 2 and done["merge"] == 2 and done["mixture"] == 1, done
    # zoo models, merged models, the mixture: on the test and on the proxy split
    assert done["evaluate"] == 2 * (5 + 2 + 1) and done["final"] == 1
    scored = db.query("SELECT DISTINCT task FROM scores ORDER BY task")["task"].to_list()
    assert scored == ["my_last_letter", "my_sums"]
    # the search scored on the user's task and the mixture's router accuracy too
    trials = db.query("SELECT count(*) FROM trials").item()
    assert trials >= 2 * 3
    (meta,) = db.query("SELECT meta FROM artifacts WHERE kind = 'mixture'")["meta"].to_list()
    accuracy = {a["task"] for a in json.loads(meta)["router_accuracy"]}
    # tasks whose test documents no expert answers have none (nothing to route well)
    assert "my_sums" in accuracy and accuracy <= {"my_sums", "my_last_letter", "all"}
    # the mixture's experts are the two merged models, referenced inside the store
    # relative to the mixture (the store can move)
    (mix_json,) = (user_dir / "state" / "store" / "mixture").glob("*/mixture.json")
    refs = [e["path"] for e in json.loads(mix_json.read_text())["experts"]]
    assert len(refs) == 2 and all(p.startswith("../../model/") for p in refs), refs
    status, error = db.query("SELECT status, error FROM flow_runs").row(0)
    assert status == "completed" and error.startswith("left out broken: CheckpointError")
    # threshold auto: the two families apart, recorded with the gap it was chosen from
    t = db.query("SELECT rule, threshold, gap_low, gap_high, n_pairs FROM cluster_thresholds")
    rule, threshold, low, high, n_pairs = t.row(0)
    assert rule == "widest-gap" and n_pairs == 10 and low < threshold < high

    # nothing changed: a rerun computes nothing
    again = glue_run_as_user(user_dir / "glue.yaml", cwd=tmp_path, home=tmp_path / "home")
    assert again.returncode == 0, again.stderr[-3000:]
    flow = db.query("SELECT flow_run_id FROM flow_runs ORDER BY started_at DESC LIMIT 1").item()
    computed = db.query(
        "SELECT count(*) FROM runs WHERE flow_run_id = ? AND status = 'completed'", [flow]
    ).item()
    assert computed == 0


def test_an_unknown_task_fails_before_any_stage(user_dir, tmp_path):
    config = _variant(
        user_dir,
        "typo.yaml",
        evaluation__tasks=["my_sums", "my_lastletter"],
        lineage_db="typo/lineage.duckdb",
    )
    proc = glue_run_as_user(config, cwd=tmp_path, home=tmp_path / "home")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "evaluation.tasks: unknown lm-eval task 'my_lastletter'" in err
    assert str((user_dir / "tasks").resolve()) in " ".join(err.split())
    assert "Traceback" not in err
    assert not (user_dir / "typo").exists()  # no stage ran, nothing was recorded


def test_a_run_whose_searches_fail_exits_non_zero(user_dir, tmp_path):
    config = _variant(
        user_dir,
        "failing.yaml",
        filter__proxy_tasks=["my_sums_choice"],  # two metrics, no proxy_metric: fails
        lineage_db="failing/lineage.duckdb",
    )
    proc = glue_run_as_user(config, cwd=tmp_path, home=tmp_path / "home")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and all("set filter.proxy_metric" in line for line in failed)
    db = lineage(user_dir / "failing" / "lineage.duckdb")
    status, error = db.query("SELECT status, error FROM flow_runs").row(0)
    assert status == "failed"
    assert "several metrics (acc, acc_norm)" in error and "left out broken" in error
    # what could run still ran: every readable zoo model was evaluated, and the clusters
    # whose search failed left their members as they are, so the mixture of them ran too
    assert db.query("SELECT count(DISTINCT artifact_id) FROM scores").item() == 5 + 1
    kinds = db.query("SELECT kind FROM artifacts WHERE kind = 'mixture'")["kind"].to_list()
    assert kinds == ["mixture"]


def test_a_failed_run_is_failed_in_prefect(user_dir, prefect_harness, tmp_path):
    from flows._logging import RunFailed
    from flows.glue_recipe import glue_recipe

    config = _variant(
        user_dir,
        "failing-prefect.yaml",
        filter__proxy_tasks=["my_sums_choice"],
        lineage_db=str(tmp_path / "lineage.duckdb"),
        store=str(tmp_path / "store"),
        mixture={"variant": "none"},
    )
    state = glue_recipe(str(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(RunFailed) as info:
        state.result()
    summary = info.value.summary
    assert len(summary["failures"]) == 2 and summary["excluded"].keys() == {"broken"}
    assert {row["name"] for row in summary["leaderboard"]} >= {"llama-base", "other-sums"}


@pytest.mark.parametrize(
    ("variant", "extra"),
    [("block_level", {}), ("ffn_moe", {"top_k": 1}), ("hybrid", {"hybrid_k": 1})],
)
def test_every_mixture_variant_is_built_recorded_and_evaluated(
    user_dir, prefect_harness, tmp_path, variant, extra
):
    """Same-shaped experts from two families: each variant from the config is cached,
    recorded in the lineage and evaluated; FFN-level and hybrid ones load as Mixtral, and
    the leaderboard's scores are those of the stored mixture, evaluated again here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.glue_recipe import run_config
    from model_glue.evaluate import evaluate
    from model_glue.mixture import MixtureLM, load_mixture

    config = _variant(
        user_dir,
        f"mix-{variant}.yaml",
        lineage_db=str(tmp_path / "lineage.duckdb"),
        store=str(user_dir / "state" / "store"),  # the searches and merges are reused
        mixture={"variant": variant, "router": "random", **extra},
    )
    summary = run_config(config)
    name = summary["mixture"]["name"]
    assert name == f"mixture-{variant}-random"
    board = {row["name"]: row for row in summary["leaderboard"]}
    assert board[name]["kind"] == "mixture"
    db = lineage(tmp_path / "lineage.duckdb")
    (meta,) = db.query("SELECT meta FROM artifacts WHERE kind = 'mixture'")["meta"].to_list()
    assert json.loads(meta)["variant"] == variant
    roles = db.query(
        "SELECT DISTINCT role FROM v_lineage WHERE child_name = ? ORDER BY role", [name]
    )
    assert roles["role"].to_list() == ["backbone", "expert"]  # the backbone is an expert too
    (path,) = (user_dir / "state" / "store" / "mixture").glob(f"{db.resolve(name)}")
    if variant in ("ffn_moe", "hybrid"):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert type(model).__name__ == "MixtralForCausalLM"
        target = model  # transformers' own Mixtral, with the experts' tokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        target, tokenizer = MixtureLM(load_mixture(path)), None
    # the stored mixture scored again, outside the flow: the numbers the leaderboard shows
    tasks = ["my_sums", "my_last_letter"]
    scores = evaluate(
        target, tasks, tokenizer=tokenizer, limit=15, include_paths=[str(user_dir / "tasks")]
    )
    assert {s.task for s in scores} == set(tasks)
    for s in scores:
        assert board[name][s.task] == pytest.approx(s.value, abs=1e-9), (s, board[name])
    again = run_config(config)
    assert again["counts"]["mixture"] == {"cached": 1}


def test_prefect_shows_named_task_runs_artifacts_and_stage_logs(
    user_dir, prefect_harness, tmp_path
):
    """Read back through Prefect's client what its UI shows of a run: every task run
    names what it computed, the run's artifacts hold its numbers, and its logs hold the
    stage outcome lines the console printed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    from flows.glue_recipe import glue_recipe

    config = _variant(user_dir, "ui.yaml", lineage_db=str(tmp_path / "lineage.duckdb"))
    state = glue_recipe(str(config), return_state=True)
    assert state.is_completed()
    summary = state.result()
    run_id = state.state_details.flow_run_id
    APILogHandler().flush()  # the run's logs reach the API in batches
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200
        )
    names = [r.name for r in runs]
    models = {row["name"] for row in summary["leaderboard"]}
    assert len(names) >= 5 + 2 + 1 and all(" · " in n for n in names), names
    evaluated = {
        n.split(" · ", 1)[1].removesuffix(" (proxy)") for n in names if n.startswith("evaluate")
    }
    assert evaluated == models, (evaluated, models)
    assert "fingerprint · broken" in names  # the model left out has its (failed) run
    assert any(n.startswith("similarity · arch ") and "models)" in n for n in names), names
    assert any(n.startswith("merge · merge-") for n in names), names
    assert any(n.startswith("filter · ") and "cluster of llama-base" in n for n in names)

    by_key = {a.key: a for a in artifacts}
    assert {"leaderboard", "final-model", "clusters", "report"} <= by_key.keys(), by_key.keys()
    table = by_key["leaderboard"].data
    table = json.loads(table) if isinstance(table, str) else table
    means = {row["name"]: row["mean"] for row in table}
    assert means == {row["name"]: round(row["mean"], 4) for row in summary["leaderboard"]}
    final = summary["final"]
    assert f"`{final['name']}`" in by_key["final-model"].data
    assert f"{final['gain']:+.3f}" in by_key["final-model"].data
    assert "widest-gap" in by_key["clusters"].data and "`llama-sums`" in by_key["clusters"].data
    link = by_key["report"].data  # markdown: [glue report of mine](file:///...)
    report = link[link.index("](file://") + len("](file://") : -1]
    assert Path(report).is_file() and "<html" in Path(report).read_text()[:200].lower()

    lines = [log.message for log in logs]
    for stage in ("fingerprint", "evaluate", "similarity", "cluster", "merge", "final"):
        assert any(
            line.split(" ", 2)[1:2] == [stage]
            and line.split(" ", 1)[0] in ("completed", "cached", "reused")
            for line in lines
        ), (stage, lines[:20])
    assert any("left out (unreadable" in line or "broken" in line for line in lines), lines[:40]
