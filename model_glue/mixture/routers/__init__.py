"""Router initialisations: the paper's training-free gates and a fitted linear router."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model_glue.mixture.hidden import Pooling
from model_glue.mixture.loading import MixtureError
from model_glue.mixture.prompts import PromptsInput, parse_prompts
from model_glue.mixture.routers import cheap_embed, hidden, random  # noqa: F401  (registration)
from model_glue.mixture.routers.base import GATE_INITS, GateContext, register_gate_init
from model_glue.mixture.routers.linear import LinearGate, fit_linear_router

PROMPT_FREE = {"random"}


@dataclass(frozen=True)
class RouterInit:
    """Which training-free initialisation to use (``hidden``, ``cheap_embed``, ``random``)."""

    method: str = "hidden"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in GATE_INITS:
            raise MixtureError(
                f"router.method: unknown {self.method!r} (allowed: {', '.join(sorted(GATE_INITS))})"
            )

    def to_dict(self) -> dict:
        return {"method": self.method, "seed": self.seed}


def init_gates(
    router: RouterInit,
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: PromptsInput | None,
    expert_names: Sequence[str],
    layers: Sequence[int],
    *,
    pooling: Pooling = "last",
) -> torch.Tensor:
    """Gate weights [len(layers), experts, hidden] read from ``backbone`` at ``layers``."""
    parsed = (
        None
        if router.method in PROMPT_FREE and prompts is None
        else parse_prompts(prompts, expert_names)
    )
    ctx = GateContext(
        backbone, tokenizer, parsed, len(expert_names), list(layers), pooling, router.seed
    )
    return GATE_INITS[router.method](ctx).float()


__all__ = [
    "GATE_INITS",
    "GateContext",
    "LinearGate",
    "RouterInit",
    "fit_linear_router",
    "init_gates",
    "register_gate_init",
]
