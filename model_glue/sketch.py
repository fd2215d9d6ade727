"""Random-projection sketches of a checkpoint's weight matrices, for similarity at scale.

The paper's similarity compares the input columns ``W[:, j]`` of two models' projection
matrices (cosine per column, averaged). A sketch keeps, per matrix, ``R W`` with ``R`` a
seeded Gaussian matrix ``[k, out] / sqrt(k)``: ``k`` numbers per input column instead of
``out``. Inner products survive the projection in expectation (``E[RᵀR] = I``), and so do
cosines, with an error that shrinks as ``1/sqrt(k)`` per column and averages out over a
matrix's columns and the model's matrices. ``R`` depends only on the settings, the tensor's
name and its row count: every model of an architecture is projected the same way, so two
sketches compare directly, and a sketch is linear (a task vector's sketch is the model's
sketch minus the base's).

Matrices of at most ``4 k`` rows are kept exactly (a projection would save little and
cost accuracy on the few columns such small matrices have), and so are, per architecture,
the cheapest matrices whose projection would take ``sim_all``'s predicted error past
:data:`ERROR_BUDGET` (:func:`exact_tensors`: nothing at 7B, most of the matrices of a
256-wide model). At k = 32 a projected sketch is ``32 / out`` of a matrix's values, stored
in float16: against a 7B model's bfloat16 weights 0.8% of its 4096-row matrices and 0.3% of
its 11008-row ones, about 0.55% of the checkpoint (float32 in memory, where similarity
computes).
It is made while the fingerprint stage reads the checkpoint for hashing (no extra read),
see :func:`model_glue.fingerprint.fingerprint_and_sketch`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model_glue.architectures import Layout

# 2: stored in float16; 3: the matrices the error budget needs are kept exactly; 4: at 5 sigma
SKETCH_VERSION = "4"
SKETCH_GROUPS = ("attn", "mlp", "embed")  # what a sketch holds: every group similarity reads
BUDGET_GROUPS = ("attn", "mlp")  # what sim_all compares by default: the error budget's
ERROR_BUDGET = 0.005
"""The largest ``sim_all`` error a sketch is sized for, over a zoo's pairs (the issue's
target; pairs within 0.01 of the threshold are computed exactly anyway)."""
MAX_SIGMAS = 5.0
"""How many predicted standard deviations (:func:`predicted_error`) the worst pair of a zoo
is allowed to lie from the exact value. The errors of unrelated pairs are about normal and
independent; the largest of ``n`` of them exceeds ``z`` sigma with probability about
``n * P(|Z| > z)``: 5 sigma once in 1.7 million pairs (``P = 5.7e-7``; a zoo of 1,800
models), where a zoo of 1000 (500,000 pairs) expects its worst pair near 4.9 sigma and the
zoo of 300 measured 4.3. Larger zoos may see pairs slightly past the budget: unrelated
models far from any threshold (pairs near it are computed exactly)."""


@dataclass(frozen=True)
class SketchSettings:
    """``k``: numbers kept per input column; ``seed``: of the projections (the same for
    every model that is to be compared); ``budget``: the ``sim_all`` error the sketch is
    sized for (:func:`exact_tensors`), None to project every matrix of more than ``4 k``
    rows whatever the error."""

    k: int = 32
    seed: int = 0
    budget: float | None = ERROR_BUDGET

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"sketch k must be >= 1, got {self.k}")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"sketch budget must be > 0 or None, got {self.budget}")

    def to_dict(self) -> dict:
        return {"k": self.k, "seed": self.seed, "budget": self.budget, "v": SKETCH_VERSION}


@functools.lru_cache(maxsize=256)
def projection(tensor: str, rows: int, k: int, seed: int) -> torch.Tensor:
    """The ``[k, rows]`` Gaussian projection of one tensor's input columns."""
    digest = hashlib.sha256(f"{seed}|{tensor}|{rows}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(k, rows, generator=g, dtype=torch.float32) / math.sqrt(k)


def column_shape(layout: Layout, name: str, shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, columns)`` of a stored 2-D tensor's input columns: ``rows`` numbers each."""
    rows, cols = layout.input_columns(name, torch.empty(tuple(shape), device="meta")).shape
    return rows, cols


def always_exact(rows: int, settings: SketchSettings) -> bool:
    """A matrix of at most ``4 k`` rows is kept exactly whatever the budget."""
    return rows <= 4 * settings.k


def _projected_variances(
    layout: Layout, shapes: Mapping[str, Sequence[int]], settings: SketchSettings
) -> tuple[int, dict[str, tuple[int, int]]]:
    """The number of compared matrices, and ``(rows, columns)`` of those a budget-free
    sketch projects."""
    compared = layout.select(BUDGET_GROUPS)
    projected = {}
    for t in compared:
        if len(shapes[t]) == 2:
            rows, cols = column_shape(layout, t, shapes[t])
            if not always_exact(rows, settings):
                projected[t] = (rows, cols)
    return len(compared), projected


def _sigma(variances: Iterable[float], n_compared: int, k: int) -> float:
    return (1 + 1 / (2 * k)) * math.sqrt(math.fsum(variances)) / max(n_compared, 1)


def predicted_error(
    layout: Layout,
    shapes: Mapping[str, Sequence[int]],
    settings: SketchSettings,
    exact: Collection[str] = (),
) -> float:
    """The predicted standard deviation of ``sim_all`` (the mean over the compared
    matrices, :data:`BUDGET_GROUPS`, of their mean column cosine) between two unrelated
    models, estimated from sketches that keep ``exact`` (and every matrix of at most
    ``4 k`` rows) exactly and project the others to ``k`` rows.

    The cosine of two nearly orthogonal columns estimated from their k-dimensional
    Gaussian projections has variance ``1 / k`` (two independent isotropic k-vectors), and
    the columns' errors are independent: a projected matrix of ``c`` columns contributes
    ``1 / (k c)`` to its mean's variance, an exact one nothing, and ``sim_all`` averages
    ``T`` matrices: ``sigma^2 = (1 + 1/2k)^2 / T^2 * sum over projected matrices of
    1 / (k c)`` (``1 + 1/2k``: :func:`debias`'s scale near 0). Pairs of related models
    (cosine ``c0``) err less, by about ``1 - c0^2``. The columns of a trained checkpoint are
    not independent random vectors; at the widths where everything is projected (thousands
    of rows) they are nearly orthogonal, and pairs near the threshold are computed exactly."""
    n, projected = _projected_variances(layout, shapes, settings)
    k = settings.k
    return _sigma((1 / (k * c) for t, (_, c) in projected.items() if t not in exact), n, k)


def exact_tensors(
    layout: Layout, shapes: Mapping[str, Sequence[int]], settings: SketchSettings
) -> frozenset[str]:
    """The matrices a sketch keeps exactly beyond those of at most ``4 k`` rows, so that
    :data:`MAX_SIGMAS` times :func:`predicted_error` is at most the settings' budget: the
    cheapest first, until the budget holds. A matrix's price is the values keeping it adds
    to the sketch, ``(rows - k) c``, per variance it removes, ``1 / (k c)``: among matrices
    of one width the fewest rows first (a 256-wide Llama keeps its attention matrices,
    then some of its gate/up ones), a matrix of many columns last (its error is already
    averaged over them).

    The choice depends only on the names and shapes of the compared matrices (not on the
    vocabulary, not on the weights): every model of an architecture keeps the same
    matrices, so their sketches compare. At 7B shapes (4096 wide, 11008 intermediate, 32
    layers) it is empty: the error averages over 1.1M columns (5 sigma = 0.0009)."""
    if settings.budget is None:
        return frozenset()
    n, projected = _projected_variances(layout, shapes, settings)
    k = settings.k
    variance = {t: 1 / (k * c) for t, (_, c) in projected.items()}
    order = sorted(
        projected, key=lambda t: ((projected[t][0] - k) * projected[t][1] ** 2, *projected[t], t)
    )
    limit = settings.budget / MAX_SIGMAS
    exact: set[str] = set()
    for t in order:
        if _sigma((v for u, v in variance.items() if u not in exact), n, k) <= limit:
            break
        exact.add(t)
    return frozenset(exact)


def sketch_columns(
    tensor: str, columns: torch.Tensor, settings: SketchSettings, exact: bool = False
) -> torch.Tensor:
    """``[out, in]`` input columns -> ``[k, in]`` float32 sketch; with ``exact`` (the
    budget's choice, :func:`exact_tensors`), and for a matrix of at most ``4 k`` rows, the
    columns as they are (small matrices have too few columns for the projection's errors to
    average out)."""
    if exact or always_exact(columns.shape[0], settings):
        return columns.float().clone()
    r = projection(tensor, columns.shape[0], settings.k, settings.seed)
    return r @ columns.float()


def sketch_tensor(
    layout: Layout,
    name: str,
    tensor: torch.Tensor,
    settings: SketchSettings,
    exact: Collection[str] = (),
) -> torch.Tensor:
    """The sketch of one stored tensor (Conv1D ``[in, out]`` storage is transposed first);
    ``exact``: the checkpoint's :func:`exact_tensors`."""
    return sketch_entries(layout, name, tensor, settings, exact)[name]


def rows_name(tensor: str) -> str:
    """Where a sketch keeps a tensor's row count (the length of its input columns)."""
    return f"{tensor}#rows"


def sketch_entries(
    layout: Layout,
    name: str,
    tensor: torch.Tensor,
    settings: SketchSettings,
    exact: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """What a sketch keeps of one tensor: its (projected or exact) columns, and its row
    count, which says whether they were projected (similarity corrects the projection's
    small bias on cosines, see :func:`debias`). ``exact``: the matrices the checkpoint's
    budget keeps exactly (:func:`exact_tensors` of its layout and shapes)."""
    columns = layout.input_columns(name, tensor[None])[0]
    return {
        name: sketch_columns(name, columns, settings, name in exact),
        rows_name(name): torch.tensor([columns.shape[0]], dtype=torch.int64),
    }


def projected_rows(sketch: Mapping[str, torch.Tensor], tensor: str) -> int | None:
    """``k`` when the sketch of ``tensor`` is a projection, None when it is exact."""
    k = sketch[tensor].shape[0]
    rows = sketch.get(rows_name(tensor))
    return k if rows is not None and k < int(rows[0]) else None


def debias(cos: torch.Tensor, k: int) -> torch.Tensor:
    """The cosine of two columns estimated from their ``k``-dimensional projections is,
    like a sample correlation of k pairs, biased toward 0: E[r] = c (1 - (1 - c^2) / 2k)
    to first order (Fisher). Averaging over columns keeps a bias, it does not remove it
    (0.006 at c = 0.6 with k = 32); this inverts it to first order."""
    return cos * (1 + (1 - cos * cos) / (2 * k))


def sketched_tensors(layout: Layout) -> list[str]:
    """The tensors a sketch holds: the 2-D tensors of every group similarity may read."""
    return layout.select(SKETCH_GROUPS)


def save_sketch(sketches: Mapping[str, torch.Tensor], path: Path, settings: SketchSettings) -> None:
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in settings.to_dict().items()}
    half = torch.finfo(torch.float16).max / 2

    def stored(t: torch.Tensor) -> torch.Tensor:  # float16 halves the size; cosines keep
        if t.is_floating_point() and (t.numel() == 0 or float(t.abs().max()) < half):
            return t.to(torch.float16).contiguous()
        return t.contiguous()

    save_file({n: stored(t) for n, t in sketches.items()}, str(path), metadata=meta)


def load_sketch(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def sketch_bytes(sketches: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sketches)
