"""FFN-level mixture: the experts' MLPs as the experts of one MoE model of their family
(Mixtral, Qwen2-MoE, Qwen3-MoE), which transformers loads (Model-GLUE's FFN-level MoE)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from model_glue.mixture.variants._base import (
    VARIANTS,
    BuildInputs,
    MixtureVariant,
    VariantSettings,
    catalog_refusal,
    load_transformers,
)


class FfnMoeSettings(VariantSettings):
    variant: Literal["ffn_moe"]
    top_k: int | None = Field(default=None, ge=1)  # experts per token (default: all)


def _build(inputs: BuildInputs, s: FfnMoeSettings) -> Path:
    from model_glue.mixture.ffn_moe import build_ffn_moe

    return build_ffn_moe(
        inputs.backbone,
        inputs.experts,
        inputs.out,
        top_k=s.top_k,
        router=inputs.router,
        prompts=inputs.prompts,
        expert_names=inputs.names,
    )


VARIANTS.register(
    MixtureVariant(
        "ffn_moe",
        doc="the experts' MLPs in one MoE model of their family (Mixtral for Llama)",
        settings=FfnMoeSettings,
        build=_build,
        load=load_transformers,
        refusal=catalog_refusal("moe_refusal"),
    )
)
