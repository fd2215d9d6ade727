"""One entry point that reopens any mixture directory written by this package."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from model_glue.mixture.block_level import load_block_level_mixture
from model_glue.mixture.loading import MixtureError, load_model
from model_glue.mixture.model_level import load_model_level_mixture

MIXTURE_FILE = "mixture.json"
KINDS = ("model_level", "block_level", "ffn_moe", "hybrid")


def read_record(path: str | Path) -> dict:
    file = Path(path) / MIXTURE_FILE
    if not file.exists():
        raise MixtureError(f"{path}: no {MIXTURE_FILE} (not a mixture directory)")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise MixtureError(f"{file}: invalid JSON ({e})") from e
    if record.get("format") != "model-glue-mixture" or record.get("kind") not in KINDS:
        raise MixtureError(
            f"{file}: kind {record.get('kind')!r} unknown (allowed: {', '.join(KINDS)})"
        )
    if record.get("version") != 1:
        raise MixtureError(f"{file}: version {record.get('version')!r} unsupported (expected 1)")
    return record


def load_mixture(
    path: str | Path, *, device: str = "cpu", dtype: str | None = "float32"
) -> nn.Module:
    """A :class:`ModelLevelMixture`, :class:`BlockLevelMixture`, or (FFN-level and hybrid) the
    ``MixtralForCausalLM`` that transformers itself loads from the directory, with its
    models on ``device`` in ``dtype`` (``auto``: see :mod:`model_glue.devices`)."""
    record = read_record(path)
    kind = record["kind"]
    if kind == "model_level":
        return load_model_level_mixture(path, record, device, dtype)
    if kind == "block_level":
        return load_block_level_mixture(path, record, device, dtype)
    return load_model(path, f"{kind} mixture", device=device, dtype=dtype)
