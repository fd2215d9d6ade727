"""A linear router fitted on proxy data (beyond the paper, whose routers are training-free).

Label of a proxy sample: the set of experts that answer it correctly. The router is a softmax
regression from the pooled hidden state to that set (soft targets spread evenly over the
correct experts; samples no expert answers carry no signal and are dropped). Features are
standardised for a well-conditioned fit and the scaling is folded back into the weights, so the
result is an ordinary gate ``W h + b`` on raw hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from model_glue.mixture.errors import MixtureError
from model_glue.mixture.routers.base import ROUTERS, Router

if TYPE_CHECKING:
    import torch

ROUTERS.register(
    Router(
        "linear",
        doc="a softmax regression fitted on which expert answers which proxy document",
        needs_prompts=False,
        fitted=True,
    )
)


@dataclass(frozen=True)
class LinearGate:
    """A fitted gate: scores = weight @ h + bias, weight [experts, hidden], bias [experts]."""

    weight: torch.Tensor
    bias: torch.Tensor
    train_accuracy: float  # share of answerable proxy samples routed to a correct expert
    n_train: int


def fit_linear_router(
    features: torch.Tensor,
    correct: torch.Tensor,
    *,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> LinearGate:
    """Fit ``W, b`` on ``features`` [N, H] and ``correct`` [N, E] (1 where expert e is right)."""
    import torch

    if features.ndim != 2 or correct.ndim != 2 or features.shape[0] != correct.shape[0]:
        raise MixtureError(
            f"fit_linear_router: features {tuple(features.shape)} and correct {tuple(correct.shape)} "
            "must be [N, H] and [N, E] with the same N"
        )
    correct = correct.float()
    keep = correct.sum(1) > 0
    if keep.sum() == 0:
        raise MixtureError("fit_linear_router: no proxy sample is answered correctly by any expert")
    x, y = features[keep].double(), correct[keep].double()
    y = y / y.sum(1, keepdim=True)
    mu, sigma = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sigma
    w = torch.zeros(y.shape[1], z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logp = torch.log_softmax(z @ w.T + b, dim=1)
        loss = -(y * logp).sum(1).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = w / sigma
        bias = b - weight @ mu
        picks = (x @ weight.T + bias).argmax(1)
        acc = float((y[torch.arange(len(y)), picks] > 0).double().mean())
    return LinearGate(weight.float(), bias.float(), acc, int(keep.sum()))
