"""The paper's ``random`` gate: a seeded baseline that ignores the experts' skills."""

from __future__ import annotations

import torch

from model_glue.mixture.routers.base import GateContext, l2_normalise, register_gate_init


@register_gate_init("random")
def random_gates(ctx: GateContext) -> torch.Tensor:
    gen = torch.Generator().manual_seed(ctx.seed)
    shape = (len(ctx.layers), ctx.num_experts, ctx.model.config.hidden_size)
    return l2_normalise(torch.randn(shape, generator=gen))
