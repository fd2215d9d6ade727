"""The paper's ``hidden`` gate: what distinguishes an expert's prompts in the residual stream.

Per expert and layer: mean pooled (last-token in the paper) hidden state entering the layer over its positive prompts,
minus the mean over its negative prompts (if any), L2-normalised.
"""

from __future__ import annotations

import torch

from model_glue.mixture.hidden import layer_inputs
from model_glue.mixture.loading import MixtureError
from model_glue.mixture.routers.base import GateContext, l2_normalise, register_gate_init


@register_gate_init("hidden")
def hidden_gates(ctx: GateContext) -> torch.Tensor:
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
