"""Mixtures: combining models that cannot be merged (Model-GLUE, section 5 of MODEL_GLUE.md).

- FFN-level: :func:`build_ffn_moe` writes a transformers ``MixtralForCausalLM`` from dense Llamas.
- Hybrid: :func:`build_hybrid`, the first k layers merged, the rest FFN-level.
- Block-level: :func:`build_block_level_mixture`, whole decoder layers as experts.
- Model-level: :func:`build_model_level_mixture`, one expert model per sample.
- Routers: :class:`RouterInit` (``hidden``, ``cheap_embed``, ``random``), :func:`fit_linear_router`.
- Evaluation: :class:`MixtureLM` (lm-eval ``glue-mixture``), :func:`router_accuracy`.
"""

import importlib

# name -> module: imported on first use, so that the run configuration can read the
# variants' and routers' declarations without torch and transformers
_LAZY = {
    "ExpertCorrectness": "accuracy",
    "RouterAccuracy": "accuracy",
    "expert_correctness": "accuracy",
    "fit_mixture_router": "accuracy",
    "mixture_router_accuracy": "accuracy",
    "router_accuracy": "accuracy",
    "BlockLevelMixture": "block_level",
    "build_block_level_mixture": "block_level",
    "build_ffn_moe": "ffn_moe",
    "build_hybrid": "variants.hybrid",
    "build_mixture": "variants",
    "load_mixture": "variants",
    "MixtureError": "errors",
    "uniform_average": "merged",
    "ModelLevelMixture": "model_level",
    "build_model_level_mixture": "model_level",
    "LinearGate": "routers",
    "RouterInit": "routers",
    "fit_linear_router": "routers",
    "MixtureLM": "lm",  # lm-eval takes seconds to import
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
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
    "build_mixture",
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
