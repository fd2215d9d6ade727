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
cost accuracy on the few columns such small matrices have). At k = 32 a sketch is
``32 / out`` of a matrix's values, stored in float16: against a 7B model's bfloat16 weights
0.8% of its 4096-row matrices and 0.3% of its 11008-row ones, about 0.55% of the checkpoint
(float32 in memory, where similarity computes).
It is made while the fingerprint stage reads the checkpoint for hashing (no extra read),
see :func:`model_glue.fingerprint.fingerprint_and_sketch`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from model_glue.architectures import Layout

SKETCH_VERSION = "2"  # 2: stored in float16
SKETCH_GROUPS = ("attn", "mlp", "embed")  # what a sketch holds: every group similarity reads


@dataclass(frozen=True)
class SketchSettings:
    """``k``: numbers kept per input column; ``seed``: of the projections (the same for
    every model that is to be compared)."""

    k: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"sketch k must be >= 1, got {self.k}")

    def to_dict(self) -> dict:
        return {"k": self.k, "seed": self.seed, "v": SKETCH_VERSION}


@functools.lru_cache(maxsize=256)
def projection(tensor: str, rows: int, k: int, seed: int) -> torch.Tensor:
    """The ``[k, rows]`` Gaussian projection of one tensor's input columns."""
    digest = hashlib.sha256(f"{seed}|{tensor}|{rows}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(k, rows, generator=g, dtype=torch.float32) / math.sqrt(k)


def sketch_columns(tensor: str, columns: torch.Tensor, settings: SketchSettings) -> torch.Tensor:
    """``[out, in]`` input columns -> ``[k, in]`` float32 sketch; a matrix of at most
    ``4 k`` rows is kept as it is (exact; small matrices have too few columns for the
    projection's errors to average out)."""
    if columns.shape[0] <= 4 * settings.k:
        return columns.float().clone()
    r = projection(tensor, columns.shape[0], settings.k, settings.seed)
    return r @ columns.float()


def sketch_tensor(
    layout: Layout, name: str, tensor: torch.Tensor, settings: SketchSettings
) -> torch.Tensor:
    """The sketch of one stored tensor (Conv1D ``[in, out]`` storage is transposed first)."""
    return sketch_entries(layout, name, tensor, settings)[name]


def rows_name(tensor: str) -> str:
    """Where a sketch keeps a tensor's row count (the length of its input columns)."""
    return f"{tensor}#rows"


def sketch_entries(
    layout: Layout, name: str, tensor: torch.Tensor, settings: SketchSettings
) -> dict[str, torch.Tensor]:
    """What a sketch keeps of one tensor: its (projected or exact) columns, and its row
    count, which says whether they were projected (similarity corrects the projection's
    small bias on cosines, see :func:`debias`)."""
    columns = layout.input_columns(name, tensor[None])[0]
    return {
        name: sketch_columns(name, columns, settings),
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
