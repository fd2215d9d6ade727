"""Hybrid mixture: the first k layers merged (dense), the rest an FFN-level mixture.

The paper gives no rule for k (its example: 16 of 32); ``bench/mixture_bench.py`` sweeps it on
the demo zoo. The result is an ordinary Mixtral directory (see :mod:`ffn_moe` for how the dense
layers are represented).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from model_glue.mixture.ffn_moe import build_ffn_moe
from model_glue.mixture.loading import ModelSource
from model_glue.mixture.prompts import PromptsInput
from model_glue.mixture.routers import RouterInit


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
    """Mixtral directory whose first ``k`` layers compute the merged model's dense layers."""
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
