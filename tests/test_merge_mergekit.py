"""Our merges against mergekit 0.1.5 on tiny float32 Llamas: max |difference| <= 1e-5.

Both tools read the same mergekit-style YAML file, so this also checks that our
translation of mergekit configs (defaults, base listed among the models, gradients and
filters) means what mergekit means.
"""

from __future__ import annotations

import pytest
import torch

from model_glue.checkpoint import Checkpoint
from model_glue.merge import load_merge_config, merge_to_directory
from tests.factories import merge_zoo, run_mergekit

mergekit = pytest.importorskip(
    "mergekit", reason="mergekit 0.1.5 not installed (pip install -e '.[dev]')"
)

CONFIGS = {
    "linear": """
merge_method: linear
models:
  - {model: BASE, parameters: {weight: 0.2}}
  - {model: FT0, parameters: {weight: 0.5}}
  - {model: FT1, parameters: {weight: [0.1, 0.9]}}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: BASE
models:
  - {model: FT0, parameters: {weight: 0.6}}
  - {model: FT1, parameters: {weight: [{filter: self_attn, value: 0.2}, {value: 1.0}]}}
  - {model: FT2, parameters: {weight: 0.4}}
parameters: {lambda: 0.8}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: BASE
models:
  - {model: BASE}
  - {model: FT0, parameters: {weight: 0.7, density: 0.5}}
  - {model: FT1, parameters: {weight: 0.5, density: [0.2, 0.9]}}
  - {model: FT2, parameters: {weight: 1.0, density: 0.3}}
dtype: float32
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: BASE
models:
  - {model: FT0, parameters: {weight: 1.0, density: 0.8, gamma: 0.05}}
  - {model: FT1, parameters: {weight: 0.5, density: 0.6, gamma: 0.1}}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: BASE
models:
  - {model: BASE}
  - {model: FT0}
parameters:
  t: [{filter: mlp, value: [0.1, 0.9]}, {value: 0.4}]
dtype: float32
""",
    "model_stock": """
merge_method: model_stock
base_model: BASE
models:
  - {model: FT0}
  - {model: FT1}
  - {model: FT2}
dtype: float32
""",
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkzoo")
    _, _, base, fts = merge_zoo(root, 3, layers=3)
    return {"BASE": str(base), **{f"FT{i}": str(p) for i, p in enumerate(fts)}}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_matches_mergekit(method, paths, tmp_path):
    text = CONFIGS[method]
    for key, p in paths.items():
        text = text.replace(key, p)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    run_mergekit(cfg, tmp_path / "mk")
    merge_to_directory(load_merge_config(cfg), tmp_path / "ours")
    theirs, ours = Checkpoint(str(tmp_path / "mk")), Checkpoint(str(tmp_path / "ours"))
    assert set(theirs.names()) == set(ours.names())
    base = Checkpoint(paths["BASE"])
    moved = max(float((ours.tensor(n) - base.tensor(n)).abs().max()) for n in ours.names())
    assert moved > 1e-3  # a real merge, not a copy of the base
    worst = 0.0
    for name in ours.names():
        a, b = ours.tensor(name), theirs.tensor(name)
        assert a.dtype == b.dtype == torch.float32
        worst = max(worst, float((a - b).abs().max()))
    print(f"{method}: max |ours - mergekit| = {worst:.2e}")
    assert worst <= 1e-5, f"{method}: max |ours - mergekit| = {worst}"
