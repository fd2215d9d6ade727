"""The paper's ``random`` gate: a seeded baseline that ignores the experts' skills."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_glue.mixture.routers.base import GateContext, l2_normalise, register_router

if TYPE_CHECKING:
    import torch


@register_router(
    "random",
    doc="a seeded random gate, the paper's baseline",
    needs_prompts=False,
)
def random_gates(ctx: GateContext) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed(ctx.seed)
    shape = (len(ctx.layers), ctx.num_experts, ctx.model.config.hidden_size)
    return l2_normalise(torch.randn(shape, generator=gen))
