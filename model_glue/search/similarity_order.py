"""Similarity of the *current merge* to a candidate, for the "Heuristic (Similarity)" order.

The pairwise similarities of ``model_glue.similarity`` are between checkpoints on disk; the
greedy search needs the similarity of an in-memory merge to each remaining model. Following
the paper's choice for this heuristic, only MLP matrices count: per matrix the mean cosine
of input columns (the same ``column_cosine`` as clustering uses), averaged over matrices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model_glue.similarity import column_cosine, select_tensors


def mlp_similarity(
    merge: Mapping[str, torch.Tensor],
    candidate: Mapping[str, torch.Tensor],
    *,
    candidate_name: str = "candidate",
) -> float:
    """Mean per-column cosine over the MLP matrices of two state dicts."""
    names = select_tensors(merge.keys(), ("mlp",))
    if not names:
        raise ValueError(
            "similarity order: the merge has no MLP projection matrices (gate/up/down_proj)"
        )
    total = 0.0
    for n in names:
        other = candidate.get(n)
        if other is None or other.shape != merge[n].shape:
            raise ValueError(
                f"similarity order: {candidate_name} lacks tensor {n!r} of shape {tuple(merge[n].shape)}"
            )
        total += column_cosine(merge[n].float(), other.float())
    return total / len(names)
