"""What a router initialisation receives and returns, and the registry that names them.

A gate at one layer is a matrix W [experts, hidden]; the router scores a pooled hidden state h
with W h (plus an optional bias) and picks the top-k experts. Initialisations produce one W per
requested layer; adding one is a new module that registers a function here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model_glue.mixture.hidden import Pooling
from model_glue.mixture.prompts import ExpertPrompts


@dataclass(frozen=True)
class GateContext:
    """Everything a training-free initialisation may read."""

    model: PreTrainedModel  # the router backbone (merged model or chosen backbone)
    tokenizer: PreTrainedTokenizerBase | None
    prompts: list[ExpertPrompts] | None  # in expert order
    num_experts: int
    layers: Sequence[int]  # decoder layers whose input the gates will read
    pooling: Pooling = "last"  # how prompt states are pooled; the paper uses the last token
    seed: int = 0


GateInit = Callable[[GateContext], torch.Tensor]  # -> [len(layers), experts, hidden]
GATE_INITS: dict[str, GateInit] = {}


def register_gate_init(name: str) -> Callable[[GateInit], GateInit]:
    def deco(fn: GateInit) -> GateInit:
        GATE_INITS[name] = fn
        return fn

    return deco


def l2_normalise(vectors: torch.Tensor) -> torch.Tensor:
    """Unit rows, so that no expert wins only because its prompts have larger activations."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
