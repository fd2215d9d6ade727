"""``glue mix``: a mixture from a YAML file, as ``glue merge`` builds a merge."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.factories import GLUE


def _mix(tmp_path: Path, spec: dict, out: str = "out") -> subprocess.CompletedProcess:
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    return subprocess.run(
        [GLUE, "mix", str(tmp_path / "mix.yaml"), str(tmp_path / out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_glue_mix_writes_a_mixtral_that_transformers_loads(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "models").symlink_to(tiny_family["base"].parent)
    spec = {
        "variant": "ffn_moe",
        "experts": ["models/a", "models/b"],
        "router": "hidden",
        "top_k": 1,
        "prompts": {"a": ["3+4=", "1+2="], "b": ["last cat=", "last dog="]},
    }
    proc = _mix(tmp_path, spec)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 1


def test_glue_mix_errors_name_the_file_and_key(tmp_path):
    spec = {"variant": "hybrid", "experts": ["a", "b"], "router": "random"}
    proc = _mix(tmp_path, spec)
    assert proc.returncode == 2
    assert "mix.yaml: hybrid_k: the hybrid variant needs hybrid_k >= 1" in proc.stderr
    proc = _mix(tmp_path, {**spec, "variant": "ffn_moe", "typo": 1})
    assert proc.returncode == 2 and "mix.yaml: typo: Extra inputs" in proc.stderr
    assert not (tmp_path / "out").exists()
