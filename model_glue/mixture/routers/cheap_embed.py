"""The paper's ``cheap_embed`` gate: no forward pass, only the input embedding table.

Per expert: the sum of the token embeddings of all its positive prompts, L2-normalised, used
unchanged at every layer. Negative prompts are ignored, as in the reference code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_glue.mixture.errors import MixtureError
from model_glue.mixture.routers.base import GateContext, l2_normalise, register_router

if TYPE_CHECKING:
    import torch


@register_router(
    "cheap_embed",
    doc="the paper's gate from the input embeddings of an expert's prompts (no forward pass)",
    needs_prompts=True,
)
def cheap_embed_gates(ctx: GateContext) -> torch.Tensor:
    import torch

    if ctx.prompts is None or ctx.tokenizer is None:
        raise MixtureError(
            "router 'cheap_embed' needs prompts per expert and the backbone's tokenizer"
        )
    table = ctx.model.get_input_embeddings().weight.detach().float().cpu()
    vecs = []
    for expert in ctx.prompts:
        ids = [i for text in expert.positive for i in ctx.tokenizer(text)["input_ids"]]
        vecs.append(table[torch.tensor(ids, dtype=torch.long)].sum(0))
    gate = l2_normalise(torch.stack(vecs))
    return gate.expand(len(ctx.layers), -1, -1).clone()
