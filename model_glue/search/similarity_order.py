"""Similarity of the *current merge* to a candidate, for the "Heuristic (Similarity)" order.

The pairwise similarities of ``model_glue.similarity`` are between checkpoints on disk; the
greedy search needs the similarity of an in-memory merge to each remaining model. Following
the paper's choice for this heuristic, only MLP matrices count: per matrix the mean cosine
of input columns (the same ``column_cosine`` as clustering uses), averaged over matrices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model_glue.architectures import Layout
from model_glue.similarity import column_cosine


def mlp_similarity(
    merge: Mapping[str, torch.Tensor],
    candidate: Mapping[str, torch.Tensor],
    layout: Layout,
    *,
    candidate_name: str = "candidate",
) -> float:
    """Mean per-column cosine over the MLP matrices (``layout``'s) of two state dicts."""
    names = [n for n in layout.select(("mlp",)) if n in merge]
    if not names:
        raise ValueError(f"similarity order: no MLP projection matrices ({layout.describe()})")
    total = 0.0
    for n in names:
        other = candidate.get(n)
        if other is None or other.shape != merge[n].shape:
            raise ValueError(
                f"similarity order: {candidate_name} lacks tensor {n!r} of shape {tuple(merge[n].shape)}"
            )
        a, b = (layout.input_columns(n, t.float()) for t in (merge[n], other))
        total += column_cosine(a, b)
    return total / len(names)
