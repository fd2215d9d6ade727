"""Mixture variants, one module each: ``model_level``, ``block_level``, ``ffn_moe`` and
``hybrid`` (see :mod:`model_glue.mixture.variants._base` for what a variant declares)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from model_glue.mixture.record import MIXTURE_FILE, read_record
from model_glue.mixture.variants._base import (
    VARIANTS,
    BuildInputs,
    MixtureVariant,
    VariantSettings,
    load_transformers,
)

if TYPE_CHECKING:
    from torch import nn


def build_mixture(settings: VariantSettings, inputs: BuildInputs) -> Path:
    """Write the mixture ``settings`` describe into the new directory ``inputs.out``."""
    return settings.spec.build(inputs, settings)


def refusal(variant: str, config: dict) -> str | None:
    """Why a model with this ``config.json`` cannot be an expert of ``variant``."""
    check = VARIANTS[variant].refusal
    return check(config) if check else None


def load_mixture(
    path: str | Path, *, device: str = "cpu", dtype: str | None = "float32"
) -> nn.Module:
    """Reopen any mixture directory written by this package, with its models on ``device``
    in ``dtype`` (``auto``: see :mod:`model_glue.devices`)."""
    record = read_record(path, VARIANTS.names())
    return VARIANTS[record["kind"]].load(Path(path), record, device, dtype)


__all__ = [
    "MIXTURE_FILE",
    "VARIANTS",
    "BuildInputs",
    "MixtureVariant",
    "VariantSettings",
    "build_mixture",
    "load_mixture",
    "load_transformers",
    "read_record",
    "refusal",
]
