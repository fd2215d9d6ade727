"""What a router receives and returns, and the registry that names the routers.

A gate at one layer is a matrix W [experts, hidden]; the router scores a pooled hidden state h
with W h (plus an optional bias) and picks the top-k experts. A training-free router
produces one W per requested layer from the backbone (and example prompts); a fitted router
learns W from proxy labels, which only a mixture that routes whole samples has. Adding a
router is one module in this package that registers a :class:`Router`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model_glue.registry import Registry

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from model_glue.mixture.prompts import ExpertPrompts


@dataclass(frozen=True)
class GateContext:
    """Everything a training-free initialisation may read."""

    model: PreTrainedModel  # the router backbone (merged model or chosen backbone)
    tokenizer: PreTrainedTokenizerBase | None
    prompts: list[ExpertPrompts] | None  # in expert order
    num_experts: int
    layers: Sequence[int]  # decoder layers whose input the gates will read
    pooling: str = "last"  # how prompt states are pooled; the paper uses the last token
    seed: int = 0


GateInit = Callable[[GateContext], "torch.Tensor"]  # -> [len(layers), experts, hidden]


@dataclass(frozen=True)
class Router:
    """A router: its name, what it needs and how its gates are made.

    ``init`` builds training-free gates; a ``fitted`` router has none and is fitted on the
    proxy labels of an expert selection (model-level mixtures only)."""

    name: str
    doc: str
    needs_prompts: bool
    init: GateInit | None = None
    fitted: bool = False


ROUTERS: Registry[Router] = Registry("router", "model_glue.mixture.routers")


def register_router(name: str, *, doc: str, needs_prompts: bool) -> Callable[[GateInit], GateInit]:
    """Register a training-free gate initialisation under ``name``."""

    def deco(fn: GateInit) -> GateInit:
        ROUTERS.register(Router(name, doc, needs_prompts, init=fn))
        return fn

    return deco


def l2_normalise(vectors: torch.Tensor) -> torch.Tensor:
    """Unit rows, so that no expert wins only because its prompts have larger activations."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
