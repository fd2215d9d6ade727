"""Linear merge (model soup, Wortsman et al. 2022): sum_i w_i theta_i / sum_i w_i."""

from __future__ import annotations

from model_glue.merge.methods._common import WEIGHT, normalize
from model_glue.merge.registry import merge_method


@merge_method(
    "linear",
    params=(WEIGHT, normalize(True)),
    base="none",
    summary="weighted average of the models (model soup)",
    reference="https://arxiv.org/abs/2203.05482",
    chunked=True,
)
def linear_merge(base, models, params, ctx):
    weights = params["weight"]
    out = models[0]
    if weights[0] != 1.0:
        out.mul_(weights[0])
    for m, w in zip(models[1:], weights[1:], strict=True):
        out.add_(m, alpha=w)
    if params["normalize"]:
        total = float(sum(weights))
        if total == 0:
            raise ValueError(
                f"linear merge of {ctx.tensor_name!r}: the weights sum to 0, cannot normalize"
            )
        out.div_(total)
    return out
