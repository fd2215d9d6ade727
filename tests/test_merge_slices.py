"""``slices:`` (mergekit's stacking): depth up-scaling of one model, a two-model
frankenmerge and per-slice merges, against mergekit 0.1.5 on the same YAML file, and the
stacked config (layer count, per-layer fields) loadable by transformers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_glue.checkpoint import Checkpoint
from model_glue.merge import MergeConfigError, load_merge_config, merge_to_directory
from model_glue.merge.plan import MergeInputError
from tests.factories import merge_zoo, run_mergekit

GLUE = str(Path(sys.executable).with_name("glue"))

CONFIGS = {
    # SOLAR-style depth up-scaling: one model's layers [0, 3) then [1, 4) -> 6 layers
    "upscale": """
slices:
  - sources: [{model: BASE, layer_range: [0, 3]}]
  - sources: [{model: BASE, layer_range: [1, 4]}]
merge_method: passthrough
dtype: float32
""",
    # a frankenmerge: embeddings from FT0's slice, norm and head from FT1's
    "frankenmerge": """
slices:
  - sources: [{model: FT0, layer_range: [0, 2]}]
  - sources: [{model: FT1, layer_range: [1, 4]}]
merge_method: passthrough
dtype: float32
""",
    # merged slices: slerp per slice with gradients over each slice, slice parameters
    "slerp-slices": """
slices:
  - sources:
      - {model: BASE, layer_range: [0, 2]}
      - {model: FT0, layer_range: [0, 2]}
  - sources:
      - {model: BASE, layer_range: [2, 4]}
      - {model: FT0, layer_range: [2, 4]}
    parameters: {t: [{filter: mlp, value: 0.8}, {value: [0.2, 0.6]}]}
merge_method: slerp
base_model: BASE
parameters: {t: [0.1, 0.9]}
dtype: float32
""",
    # per-source parameters inside slices, three-layer slices
    "linear-slices": """
slices:
  - sources:
      - {model: FT0, layer_range: [0, 3], parameters: {weight: 0.3}}
      - {model: FT1, layer_range: [1, 4], parameters: {weight: [0.2, 0.9]}}
merge_method: linear
dtype: float32
""",
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    _, _, base, fts = merge_zoo(root, 2, layers=4)
    return {"BASE": str(base), **{f"FT{i}": str(p) for i, p in enumerate(fts)}}


def _config(tmp_path: Path, name: str, paths: dict) -> Path:
    text = CONFIGS[name]
    for key, p in paths.items():
        text = text.replace(key, p)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    return cfg


def test_a_slices_config_is_a_stack_with_the_new_depth(paths, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = load_merge_config(_config(tmp_path, "upscale", paths))
    assert spec.num_layers == 6 and [s.length for s in spec.slices] == [3, 3]
    out = merge_to_directory(spec, tmp_path / "up").out_dir
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    ours, base = Checkpoint(str(out)), Checkpoint(paths["BASE"])
    for o, b in [(0, 0), (2, 2), (3, 1), (5, 3)]:  # output layer <- source layer
        name = "self_attn.q_proj.weight"
        assert torch.equal(
            ours.tensor(f"model.layers.{o}.{name}"), base.tensor(f"model.layers.{b}.{name}")
        )
    assert torch.equal(ours.tensor("lm_head.weight"), base.tensor("lm_head.weight"))
    assert (out / "tokenizer.json").exists() and (out / "merge_config.yaml").exists()


def test_glue_merge_runs_a_frankenmerge_from_the_command_line(paths, tmp_path):
    cfg = _config(tmp_path, "frankenmerge", paths)
    proc = subprocess.run(
        [GLUE, "merge", str(cfg), str(tmp_path / "fm")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    ours, ft0, ft1 = (Checkpoint(p) for p in (str(tmp_path / "fm"), paths["FT0"], paths["FT1"]))
    assert torch.equal(
        ours.tensor("model.embed_tokens.weight"), ft0.tensor("model.embed_tokens.weight")
    )
    assert torch.equal(ours.tensor("model.norm.weight"), ft1.tensor("model.norm.weight"))
    assert torch.equal(
        ours.tensor("model.layers.2.mlp.down_proj.weight"),
        ft1.tensor("model.layers.1.mlp.down_proj.weight"),
    )


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        (
            "  - sources: [{model: BASE, layer_range: [0, 2]}, {model: FT0, layer_range: [0, 3]}]\n",
            "slices[0]: every source must give the same number of layers, got [2, 3]",
        ),
        (
            "  - sources: [{model: BASE, layer_range: [0, 2]}, {model: FT0, layer_range: [0, 2]}]\n",
            "slices[0]: merge method 'passthrough' takes at most 1 model(s)",
        ),
        ("  - sources: [{model: BASE, layer_range: [2, 2]}]\n", "layer_range: [2, 2] is empty"),
        (
            "  - sources: [{model: BASE, layers: [0, 2]}]\n",
            "expected a mapping with 'model' and 'layer_range'",
        ),
    ],
)
def test_bad_slices_are_one_line_errors_naming_the_slice(paths, tmp_path, slices, message):
    text = "slices:\n" + slices + "merge_method: passthrough\n"
    for key, p in paths.items():
        text = text.replace(key, p)
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(MergeConfigError, match=re.escape(message)):
        load_merge_config(tmp_path / "c.yaml")


def test_a_layer_range_past_the_model_and_a_base_outside_the_slice_are_refused(paths, tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"slices:\n  - sources: [{{model: {paths['BASE']}, layer_range: [2, 6]}}]\n"
        "merge_method: passthrough\n"
    )
    with pytest.raises(MergeInputError, match=r"layer_range \[2, 6\] is past the 4 layers"):
        merge_to_directory(load_merge_config(tmp_path / "c.yaml"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "d.yaml").write_text(
        f"slices:\n  - sources: [{{model: {paths['FT0']}, layer_range: [0, 2]}}]\n"
        f"merge_method: slerp\nbase_model: {paths['BASE']}\nparameters: {{t: 0.5}}\n"
    )
    with pytest.raises(MergeConfigError, match="needs the base model among the slice's sources"):
        load_merge_config(tmp_path / "d.yaml")


def test_per_layer_config_fields_follow_their_layers(tmp_path):
    """Beyond mergekit: a Qwen3 whose layers alternate sliding-window and full attention
    keeps each stacked layer's type (config.layer_types), and transformers loads it."""
    from transformers import AutoModelForCausalLM

    from model_glue.architectures.tiny import save_tiny

    src = save_tiny(tmp_path / "qwen3", "Qwen3ForCausalLM", seed=0, layers=4)
    config = json.loads((src / "config.json").read_text())
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config |= {"layer_types": types, "use_sliding_window": True, "sliding_window": 8}
    (src / "config.json").write_text(json.dumps(config))
    (tmp_path / "c.yaml").write_text(
        f"slices:\n  - sources: [{{model: {src}, layer_range: [0, 3]}}]\n"
        f"  - sources: [{{model: {src}, layer_range: [2, 4]}}]\nmerge_method: passthrough\n"
    )
    out = merge_to_directory(load_merge_config(tmp_path / "c.yaml"), tmp_path / "out").out_dir
    stacked = json.loads((out / "config.json").read_text())
    assert stacked["num_hidden_layers"] == 5
    assert stacked["layer_types"] == types[0:3] + types[2:4]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.layer_types == stacked["layer_types"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_slices_match_mergekit(name, paths, tmp_path):
    cfg = _config(tmp_path, name, paths)
    run_mergekit(cfg, tmp_path / "mk")
    merge_to_directory(load_merge_config(cfg), tmp_path / "ours")
    theirs, ours = Checkpoint(str(tmp_path / "mk")), Checkpoint(str(tmp_path / "ours"))
    assert set(theirs.names()) == set(ours.names())
    mk_config = json.loads((tmp_path / "mk" / "config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert our_config["num_hidden_layers"] == mk_config["num_hidden_layers"]
    worst = max(float((ours.tensor(n) - theirs.tensor(n)).abs().max()) for n in ours.names())
    print(f"{name}: max |ours - mergekit| = {worst:.2e}")
    assert worst <= 1e-5
