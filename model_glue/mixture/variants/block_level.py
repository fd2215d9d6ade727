"""Block-level mixture: the experts' decoder layers side by side, one routed per sample
at every depth (Model-GLUE's block-level MoE); built from Llama layers."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from model_glue.mixture.variants._base import (
    VARIANTS,
    BuildInputs,
    MixtureVariant,
    VariantSettings,
    catalog_refusal,
)


class BlockLevelSettings(VariantSettings):
    variant: Literal["block_level"]
    pooling: Literal["mean", "first"] = "mean"  # how a prompt's states become one vector


def _build(inputs: BuildInputs, s: BlockLevelSettings) -> Path:
    from model_glue.mixture.block_level import build_block_level_mixture

    return build_block_level_mixture(
        inputs.backbone,
        inputs.experts,
        inputs.out,
        pooling=s.pooling,
        router=inputs.router,
        prompts=inputs.prompts,
        expert_names=inputs.names,
    )


def _load(path: Path, record: dict, device: str, dtype: str | None):
    from model_glue.mixture.block_level import load_block_level_mixture

    return load_block_level_mixture(path, record, device, dtype)


VARIANTS.register(
    MixtureVariant(
        "block_level",
        doc="the experts' decoder layers as experts, one routed per sample at every depth",
        settings=BlockLevelSettings,
        build=_build,
        load=_load,
        own_model_class=True,
        refusal=catalog_refusal("block_refusal"),
    )
)
