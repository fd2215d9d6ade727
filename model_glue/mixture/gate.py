"""A sample-level gate: one score per expert from a pooled hidden state, top-1 decision."""

from __future__ import annotations

import torch
from torch import nn


class SampleGate(nn.Module):
    """scores = W h + b over experts; the sample goes to the arg-max (ties: lowest index)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        b = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float().clone()
        self.bias = nn.Parameter(b, requires_grad=False)

    def scores(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled.float() @ self.weight.T + self.bias

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.scores(pooled).argmax(-1)
