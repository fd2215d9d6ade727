"""Model-level mixture: one whole expert model answers each sample, chosen by a router on
the backbone's hidden state (Model-GLUE's model-level MoE)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from model_glue.mixture.variants._base import (
    VARIANTS,
    BuildInputs,
    MixtureVariant,
    VariantSettings,
)


class ModelLevelSettings(VariantSettings):
    variant: Literal["model_level"]
    layer: int = Field(default=1, ge=0)  # the backbone layer whose input the router reads
    pooling: Literal["last", "mean"] = "last"  # how a prompt's states become one vector
    # choose the experts greedily by the mixture's proxy score among every cluster's
    # model, every model filtering rejected and every singleton (false: one expert per
    # cluster, as the paper)
    select_experts: bool = True
    max_experts: int | None = Field(default=None, ge=2)
    router_accuracy: bool = True  # measure it on the evaluation tasks

    pipeline_only: ClassVar[tuple[str, ...]] = ("select_experts", "max_experts", "router_accuracy")


def _build(inputs: BuildInputs, s: ModelLevelSettings) -> Path:
    from model_glue.mixture.model_level import build_model_level_mixture

    return build_model_level_mixture(
        inputs.experts,
        inputs.out,
        router_backbone=inputs.backbone,
        layer=s.layer,
        pooling=s.pooling,
        router=inputs.router,
        prompts=inputs.prompts,
        expert_names=inputs.names,
        relative_to=inputs.relative_to,
        location=inputs.location,
        device=inputs.device,
        dtype=inputs.dtype,
    )


def _load(path: Path, record: dict, device: str, dtype: str | None):
    from model_glue.mixture.model_level import load_model_level_mixture

    return load_model_level_mixture(path, record, device, dtype)


VARIANTS.register(
    MixtureVariant(
        "model_level",
        doc="one expert model per sample, routed on the backbone's hidden state",
        settings=ModelLevelSettings,
        build=_build,
        load=_load,
        routes_samples=True,
        in_expert_dtype=True,
        own_model_class=True,
        default_router="linear",
    )
)
