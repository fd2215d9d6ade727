"""Routers: the paper's training-free gates and a fitted linear router, one module each,
registered in :data:`ROUTERS` (see :mod:`model_glue.mixture.routers.base`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model_glue.mixture.errors import MixtureError
from model_glue.mixture.routers.base import ROUTERS, GateContext, Router, register_router
from model_glue.mixture.routers.linear import LinearGate, fit_linear_router

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from model_glue.mixture.prompts import PromptsInput


@dataclass(frozen=True)
class RouterInit:
    """Which training-free router to initialise the gates with, and its seed."""

    method: str = "hidden"
    seed: int = 0

    def __post_init__(self) -> None:
        allowed = [r.name for r in ROUTERS if r.init is not None]
        if self.method not in allowed:
            raise MixtureError(
                f"router.method: unknown {self.method!r} (allowed: {', '.join(allowed)})"
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
    pooling: str = "last",
) -> torch.Tensor:
    """Gate weights [len(layers), experts, hidden] read from ``backbone`` at ``layers``."""
    from model_glue.mixture.prompts import parse_prompts

    spec = ROUTERS[router.method]
    parsed = (
        None if not spec.needs_prompts and prompts is None else parse_prompts(prompts, expert_names)
    )
    ctx = GateContext(
        backbone, tokenizer, parsed, len(expert_names), list(layers), pooling, router.seed
    )
    return spec.init(ctx).float()  # type: ignore[misc]


__all__ = [
    "ROUTERS",
    "GateContext",
    "LinearGate",
    "Router",
    "RouterInit",
    "fit_linear_router",
    "init_gates",
    "register_router",
]
