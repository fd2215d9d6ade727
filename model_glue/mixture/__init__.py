"""Mixtures: combining models that cannot be merged (Model-GLUE, section 5 of MODEL_GLUE.md).

- FFN-level: :func:`build_ffn_moe` writes a transformers ``MixtralForCausalLM`` from dense Llamas.
- Hybrid: :func:`build_hybrid`, the first k layers merged, the rest FFN-level.
- Block-level: :func:`build_block_level_mixture`, whole decoder layers as experts.
- Model-level: :func:`build_model_level_mixture`, one expert model per sample.
- Routers: :class:`RouterInit` (``hidden``, ``cheap_embed``, ``random``), :func:`fit_linear_router`.
- Evaluation: :class:`MixtureLM` (lm-eval ``glue-mixture``), :func:`router_accuracy`.
"""

from model_glue.mixture.accuracy import (
    ExpertCorrectness,
    RouterAccuracy,
    expert_correctness,
    fit_mixture_router,
    mixture_router_accuracy,
    router_accuracy,
)
from model_glue.mixture.block_level import BlockLevelMixture, build_block_level_mixture
from model_glue.mixture.ffn_moe import build_ffn_moe
from model_glue.mixture.hybrid import build_hybrid
from model_glue.mixture.load import load_mixture
from model_glue.mixture.loading import MixtureError
from model_glue.mixture.merged import uniform_average
from model_glue.mixture.model_level import ModelLevelMixture, build_model_level_mixture
from model_glue.mixture.routers import LinearGate, RouterInit, fit_linear_router


def __getattr__(name: str):
    # lm-eval takes seconds to import; only the evaluation class needs it.
    if name == "MixtureLM":
        from model_glue.mixture.lm import MixtureLM

        return MixtureLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockLevelMixture",
    "ExpertCorrectness",
    "LinearGate",
    "MixtureError",
    "MixtureLM",
    "ModelLevelMixture",
    "RouterAccuracy",
    "RouterInit",
    "build_block_level_mixture",
    "build_ffn_moe",
    "build_hybrid",
    "build_model_level_mixture",
    "expert_correctness",
    "fit_linear_router",
    "fit_mixture_router",
    "load_mixture",
    "mixture_router_accuracy",
    "router_accuracy",
    "uniform_average",
]
