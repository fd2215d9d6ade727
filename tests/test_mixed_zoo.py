"""A zoo of many architectures, as a stranger runs it: ``glue run`` in a subprocess.

Seven families of tiny random models (Llama, Mistral sharded with a bfloat16 fine-tune,
Qwen2 with biases and tied embeddings, Gemma2, Phi-3 with fused projections, GPT-NeoX,
GPT-2 with Conv1D weights), a base and a fine-tune each, and a pair of an architecture the
catalog lacks and whose tensors hold no layers: its similarity fails. Every other family is
searched (per-layer-group weights), merged, evaluated and mixed; the run exits 1 and says
which stage failed, in one line. Random models score 0: the summary says "n/a".
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from model_glue.architectures.tiny import save_tiny
from model_glue.zoo.tokenizer import build_char_tokenizer
from tests.factories import glue_run_as_user, lineage

pytestmark = [pytest.mark.slow]

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "neox": "GPTNeoXForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def _blob(path: Path, seed: int) -> None:
    """A model directory of an unknown architecture with no numbered layers."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"blob.weight": torch.randn(8, 8, generator=g)}, path / "model.safetensors")
    (path / "config.json").write_text(
        json.dumps({"architectures": ["BlobForCausalLM"], "model_type": "blob"})
    )


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stranger") / "project"
    tok = build_char_tokenizer()
    zoo = []
    for i, (fam, arch) in enumerate(FAMILIES.items()):
        shards = {"max_shard_size": "30KB"} if fam == "mistral" else {}
        base = save_tiny(
            root / "models" / f"{fam}-base", arch, seed=i, vocab=len(tok), tokenizer=tok, **shards
        )
        save_tiny(
            root / "models" / f"{fam}-ft",
            arch,
            seed=50 + i,
            base=base,
            tokenizer=tok,
            dtype="bfloat16" if fam == "mistral" else "float32",
        )
        zoo += [
            {"name": f"{fam}-base", "path": f"models/{fam}-base"},
            {"name": f"{fam}-ft", "path": f"models/{fam}-ft", "base": f"{fam}-base"},
        ]
    for n in ("blob-a", "blob-b"):
        _blob(root / "models" / n, seed=len(zoo))
        zoo.append({"name": n, "path": f"models/{n}"})
    tasks = root / "tasks"
    (tasks / "data").mkdir(parents=True)
    rng = random.Random(0)
    with (tasks / "data" / "sums.jsonl").open("w") as f:
        for _ in range(10):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            f.write(json.dumps({"q": f"{a}+{b}=", "a": str(a + b)}) + "\n")
    (tasks / "my_sums.yaml").write_text(
        "task: my_sums\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: data/sums.jsonl}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\ntarget_delimiter: ''\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 2, do_sample: false}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    config = {
        "name": "mixed",
        "store": "state/store",
        "lineage_db": "state/lineage.duckdb",
        "zoo": zoo,
        "similarity": {"threshold": 0.5},
        "filter": {"strategy": "evolutionary", "budget": 2, "layer_groups": 2, "proxy_limit": 4},
        "merge": {"method": "linear"},
        "evaluation": {"tasks": ["my_sums"], "limit": 4, "include_paths": ["tasks"]},
        "mixture": {
            "variant": "model_level",
            "router": "random",
            "layer": 1,
            "select_experts": False,
        },
    }
    (root / "glue.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def test_a_mixed_zoo_merges_every_family_and_the_failed_group_stays_apart(mixed_dir, tmp_path):
    proc = glue_run_as_user(mixed_dir / "glue.yaml", cwd=tmp_path, home=tmp_path / "home")
    out = proc.stdout + proc.stderr
    (tmp_path / "glue-run.log").write_text(out)
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert "blob-a: layout of BlobForCausalLM inferred: 0 layers, 0 projections each" in out
    failed = [line for line in out.splitlines() if "failed" in line and "similarity" in line]
    assert any("no attn/mlp tensors to compare" in line for line in failed), out[-4000:]
    assert "blob-a, blob-b stay unclustered" in out
    # every model scores 0: no fraction of the per-task best to give, and no crash
    assert "final model:" in out and "n/a of the per-task best" in out

    db = lineage(mixed_dir / "state" / "lineage.duckdb")
    done = dict(
        db.query(
            "SELECT stage, count(*) FROM runs WHERE status = 'completed' GROUP BY stage"
        ).iter_rows()
    )
    families = len(FAMILIES)
    assert done["filter"] == families and done["merge"] == families, done
    assert done["mixture"] == 1 and done["final"] == 1, done
    clusters = db.query(
        "SELECT c.cluster, list(m.name ORDER BY m.name) AS names FROM clusters c "
        "JOIN models m ON m.fingerprint = c.model_fingerprint GROUP BY c.cluster"
    )["names"].to_list()
    assert sorted(clusters) == sorted([f"{f}-base", f"{f}-ft"] for f in FAMILIES)
    merged = db.query("SELECT name FROM artifacts WHERE kind = 'merged'")["name"].to_list()
    assert len(merged) == families, merged
    # per-layer-group weights reached every family's own layer names
    out_lines = "\n".join(line for line in out.splitlines() if "accepted" in line)
    for prefix in ("model.layers.1.", "transformer.h.1.", "gpt_neox.layers.1."):
        assert f"'filter': '{prefix}'" in out_lines, prefix
    status, error = db.query("SELECT status, error FROM flow_runs").row(0)
    assert status == "failed" and "similarity" in error
