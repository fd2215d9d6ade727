"""The paper's ``hidden`` gate: what distinguishes an expert's prompts in the residual stream.

Per expert and layer: mean pooled (last-token in the paper) hidden state entering the layer over its positive prompts,
minus the mean over its negative prompts (if any), L2-normalised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_glue.mixture.errors import MixtureError
from model_glue.mixture.routers.base import GateContext, l2_normalise, register_router

if TYPE_CHECKING:
    import torch


@register_router(
    "hidden",
    doc="the paper's gate: mean hidden state of an expert's prompts minus its negatives",
    needs_prompts=True,
)
def hidden_gates(ctx: GateContext) -> torch.Tensor:
    import torch

    from model_glue.mixture.hidden import layer_inputs

    if ctx.prompts is None or ctx.tokenizer is None:
        raise MixtureError("router 'hidden' needs prompts per expert and the backbone's tokenizer")
    layers = list(ctx.layers)
    vecs = []
    for expert in ctx.prompts:
        pos = layer_inputs(ctx.model, ctx.tokenizer, expert.positive, layers, pooling=ctx.pooling)
        vec = pos.mean(1)
        if expert.negative:
            neg = layer_inputs(
                ctx.model, ctx.tokenizer, expert.negative, layers, pooling=ctx.pooling
            )
            vec = vec - neg.mean(1)
        vecs.append(vec)
    return l2_normalise(torch.stack(vecs, dim=1))
