"""Adapters in a user's zoo, as a stranger runs it: ``glue run`` in a subprocess.

One LoRA adapter names its base by a local directory that is not in the zoo (PEFT writes
the path it was trained on): the base is fingerprinted as the adapter's, not as a zoo
model. Another names a base that is nowhere: it is left out in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.factories import char_tokenizer, glue_run_as_user, lineage, save_tiny_llama
from tests.test_hub_zoo import HIDDEN, _lora, _tasks

pytestmark = [pytest.mark.slow]


def _named(adapter: Path, base: str) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": base})
    )


def test_an_adapter_of_a_base_outside_the_zoo_joins_its_family(tmp_path):
    root = tmp_path / "project"
    tok = char_tokenizer()
    outside = save_tiny_llama(
        tmp_path / "elsewhere" / "base", seed=0, vocab=len(tok), tokenizer=tok, **HIDDEN
    )
    save_tiny_llama(root / "models" / "ft", seed=1, base=outside, tokenizer=tok)
    # a fine-tune of the same base whose tokenizer numbers the tokens otherwise: its rows
    # do not mean the same tokens, so it stays out of the family, with one line
    odd = save_tiny_llama(root / "models" / "odd", seed=4, base=outside, tokenizer=tok)
    scrambled = json.loads((odd / "tokenizer.json").read_text())
    vocab = scrambled["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (odd / "tokenizer.json").write_text(json.dumps(scrambled))
    _named(_lora(outside, root / "models" / "lora", seed=2), str(outside))
    _named(_lora(outside, root / "models" / "lost", seed=3), str(tmp_path / "gone"))
    _tasks(root / "tasks")
    config = {
        "name": "adapters",
        "store": "state/store",
        "lineage_db": "state/lineage.duckdb",
        "zoo": [
            {"name": "ft", "path": "models/ft"},
            {"name": "lora", "path": "models/lora"},
            {"name": "lost", "path": "models/lost"},
            {"name": "odd", "path": "models/odd"},
        ],
        "similarity": {"threshold": 0.5},
        "evaluation": {"tasks": ["my_sums"], "limit": 4, "include_paths": ["tasks"]},
    }
    (root / "glue.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = glue_run_as_user(root / "glue.yaml", cwd=tmp_path, home=tmp_path / "home")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lost = [line.strip() for line in out.splitlines() if "left out lost" in line]
    assert len(lost) == 1 and "neither a zoo model nor a local directory" in lost[0], out[-3000:]
    assert "completed adapter     lora" in out, out[-3000:]
    apart = [line.strip() for line in out.splitlines() if line.strip().startswith("odd: kept")]
    assert len(apart) == 1 and "kept apart from ft, lora: token 5 is" in apart[0], out[-3000:]

    db = lineage(root / "state" / "lineage.duckdb")
    base_fp = db.query("SELECT fingerprint FROM models WHERE name = 'lora.base'")["fingerprint"]
    edges = db.query(
        "SELECT e.parent_id, e.role FROM edges e JOIN artifacts a ON a.artifact_id = e.child_id "
        "WHERE a.kind = 'adapted'"
    )
    assert dict(zip(edges["role"], edges["parent_id"], strict=True))["base"] == base_fp[0]
    clusters = db.query(
        "SELECT list(m.name ORDER BY m.name) AS names FROM clusters c "
        "JOIN models m ON m.fingerprint = c.model_fingerprint GROUP BY c.cluster"
    )["names"].to_list()
    assert sorted(clusters) == [["ft", "lora"], ["odd"]]
    board = db.query("SELECT DISTINCT name FROM v_leaderboard")["name"].to_list()
    assert "lora.base" not in board and "lora" in board
