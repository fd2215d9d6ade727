"""Hybrid mixture: the first ``hybrid_k`` layers of the experts' uniform average kept dense,
the rest an FFN-level mixture of their MLPs.

The paper gives no rule for k (its example: 16 of 32); ``bench/mixture_bench.py`` sweeps it
on the demo zoo. The result is an ordinary MoE directory of the experts' family (see
:mod:`model_glue.mixture.ffn_moe` for how the dense layers are represented).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from model_glue.mixture.variants._base import (
    VARIANTS,
    BuildInputs,
    MixtureVariant,
    VariantSettings,
    catalog_refusal,
    load_transformers,
)

if TYPE_CHECKING:
    from model_glue.mixture.loading import ModelSource
    from model_glue.mixture.prompts import PromptsInput
    from model_glue.mixture.routers import RouterInit


class HybridSettings(VariantSettings):
    variant: Literal["hybrid"]
    hybrid_k: int = Field(default=0, ge=0)  # dense (averaged) layers at the bottom
    top_k: int | None = Field(default=None, ge=1)  # experts per token (default: all)

    @model_validator(mode="after")
    def _needs_k(self) -> HybridSettings:
        if self.hybrid_k < 1:
            raise ValueError("hybrid_k: the hybrid variant needs hybrid_k >= 1 dense layers")
        return self


def build_hybrid(
    merged_uri_or_model: ModelSource,
    expert_uris: Sequence[ModelSource],
    out_dir: str | Path,
    *,
    k: int,
    top_k: int | None = None,
    router: RouterInit | None = None,
    prompts: PromptsInput | None = None,
    expert_names: Sequence[str] | None = None,
) -> Path:
    """A MoE directory whose first ``k`` layers compute the merged model's dense layers."""
    from model_glue.mixture.ffn_moe import build_ffn_moe

    return build_ffn_moe(
        merged_uri_or_model,
        expert_uris,
        out_dir,
        top_k=top_k,
        router=router,
        prompts=prompts,
        dense_layers=k,
        expert_names=expert_names,
    )


def _build(inputs: BuildInputs, s: HybridSettings) -> Path:
    from model_glue.mixture.merged import uniform_average

    return build_hybrid(
        uniform_average(inputs.experts),
        inputs.experts,
        inputs.out,
        k=s.hybrid_k,
        top_k=s.top_k,
        router=inputs.router,
        prompts=inputs.prompts,
        expert_names=inputs.names,
    )


VARIANTS.register(
    MixtureVariant(
        "hybrid",
        doc="the first hybrid_k layers of the experts' average dense, the rest FFN-level",
        settings=HybridSettings,
        build=_build,
        load=load_transformers,
        refusal=catalog_refusal("moe_refusal"),
    )
)
