"""Weight similarity between checkpoints of one architecture (Model-GLUE, section 1).

The paper's metric: for each attention and MLP projection matrix W [out, in], the cosine
between the two models' input columns W[:, j], averaged over columns; ``sim_all`` averages
that over all selected matrices, ``sim_attn`` / ``sim_mlp`` over their subsets. Raw weights,
not task vectors; embeddings, norms and lm_head are left out by default (norm weights start
at one and inflate every cosine). Which tensors are attention or MLP projections, and which
axis holds their input columns (GPT-2's ``Conv1D`` stores ``[in, out]``), is the checkpoint's
:class:`~model_glue.architectures.Layout`: fused projections (``qkv_proj``, ``gate_up_proj``)
are compared as they are stored.

All pairs are computed in ONE streaming pass: for each tensor name the N models' tensors are
read once and a batched Gram matrix over input columns gives every pair at the same time.
Memory is bounded by N copies of the largest selected tensor. Flat cosine (all selected
weights as one vector) and, when a base model is given, task-vector cosine come from the
same pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import combinations

import torch

from model_glue.architectures import Layout
from model_glue.checkpoint import Checkpoint
from model_glue.errors import InputError
from model_glue.sketch import debias, projected_rows

SIMILARITY_VERSION = "1"

DEFAULT_GROUPS = ("attn", "mlp")
_COLUMN_CHUNK_ELEMS = 8 * 1024 * 1024  # per model, per chunk of columns


class SimilarityError(InputError):
    """The models cannot be compared: no projection matrices, or different layouts."""


def select_tensors(layout: Layout, groups: Iterable[str] = DEFAULT_GROUPS) -> list[str]:
    """The tensors of ``groups`` in ``layout`` (attention/MLP projections, embeddings)."""
    return layout.select(groups)


def column_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The paper's metric for one matrix: mean over input columns of cos(a[:, j], b[:, j])."""
    return float(column_cosine_gram(torch.stack([a, b]))[0, 1])


def column_cosine_gram(stack: torch.Tensor, projected: int | None = None) -> torch.Tensor:
    """[N, out, in] -> [N, N] mean column cosine for every pair, chunked over columns.
    ``projected``: ``k`` when the columns are k-dimensional projections (sketches): the
    mean cosine is then corrected for the projection's bias (:func:`debias`)."""
    n, out, cols = stack.shape
    chunk = max(1, _COLUMN_CHUNK_ELEMS // max(out, 1))
    total = torch.zeros(n, n, dtype=torch.float64)
    for j in range(0, cols, chunk):
        x = stack[:, :, j : j + chunk].float().permute(2, 0, 1)  # [c, N, out]
        g = torch.bmm(x, x.transpose(1, 2))  # [c, N, N] column dot products
        norms = torch.diagonal(g, dim1=1, dim2=2).clamp_min(0).sqrt()  # [c, N]
        denom = (norms[:, :, None] * norms[:, None, :]).clamp_min(1e-12)
        total += (g / denom).sum(0).double()
    mean = total / cols
    # the bias is corrected on the mean (as sketch_matrices must): nearly the same as per
    # column, the columns of one matrix having nearly one cosine
    return mean if projected is None else debias(mean.clamp(-1, 1), projected)


def _flat_gram(stack: torch.Tensor) -> torch.Tensor:
    x = stack.reshape(stack.shape[0], -1).float()
    return (x @ x.T).double()


def _cos_from_gram(g: torch.Tensor) -> torch.Tensor:
    d = torch.diagonal(g).clamp_min(0).sqrt()
    return g / (d[:, None] * d[None, :]).clamp_min(1e-30)


@dataclass
class SimilarityResult:
    """Pairwise similarities of the models named in ``names`` (pairs ordered as (a, b), a < b)."""

    names: list[str]
    tensors: list[str]
    groups: list[str]
    base: str | None
    layers: dict[str, int | None] = field(default_factory=dict)  # tensor -> decoder layer
    summary: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    per_tensor: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)

    def value(self, a: str, b: str, metric: str = "sim_all") -> float:
        if a == b:
            return 1.0
        return self.summary[tuple(sorted((a, b)))][metric]

    def matrix(self, metric: str = "sim_all") -> list[list[float]]:
        return [[self.value(a, b, metric) for b in self.names] for a in self.names]

    def summary_records(self) -> list[dict]:
        return [
            {"model_a": a, "model_b": b, "metric": m, "value": v}
            for (a, b), metrics in sorted(self.summary.items())
            for m, v in sorted(metrics.items())
        ]

    def tensor_records(self) -> list[dict]:
        return [
            {
                "model_a": a,
                "model_b": b,
                "metric": "column_cosine",
                "tensor": t,
                "layer": self.layers.get(t),
                "value": v,
            }
            for (a, b), values in sorted(self.per_tensor.items())
            for t, v in values.items()
        ]


def pairwise_similarity(
    checkpoints: dict[str, Checkpoint],
    *,
    groups: Iterable[str] = DEFAULT_GROUPS,
    pairs: Iterable[tuple[str, str]] | None = None,
    base: Checkpoint | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimilarityResult:
    """Similarity of every requested pair (default: all pairs) in one pass over the tensors.

    Only models that appear in a requested pair are read, so adding a model to a zoo costs
    one pass over the new model and its partners, not a recomputation of every old pair.
    """
    groups = list(groups)
    names = sorted(checkpoints)
    wanted = _wanted(names, pairs)
    involved = sorted({m for p in wanted for m in p})
    if not wanted:
        return SimilarityResult(names=names, tensors=[], groups=groups, base=None)
    first = checkpoints[involved[0]]
    layout = first.layout
    tensors = select_tensors(layout, groups)
    if not tensors:
        raise SimilarityError(
            f"{first.uri}: no {'/'.join(groups)} tensors to compare ({layout.describe()})"
        )
    readers = [checkpoints[m] for m in involved] + ([base] if base is not None else [])
    rows = _common_rows(readers, layout, tensors)

    def columns(ck: Checkpoint, t: str) -> torch.Tensor:
        stored = ck.tensor(t).float()
        if t in rows:
            stored = stored[: rows[t]]
        return layout.input_columns(t, stored[None])[0] if stored.dim() == 2 else stored

    return _similarities(
        names,
        wanted,
        layout,
        tensors,
        groups,
        lambda m, t: columns(checkpoints[m], t),
        None if base is None else (base.uri, lambda t: columns(base, t)),
        progress,
    )


def _common_rows(
    checkpoints: list[Checkpoint], layout: Layout, tensors: list[str]
) -> dict[str, int]:
    """Every tensor must be shaped alike in every checkpoint, except the vocabulary rows
    of embeddings and head (a fine-tune that added tokens): those are compared on the
    rows all share (the tokens of the shortest vocabulary). Returns tensor -> rows kept."""
    first, rows = checkpoints[0], {}
    for ck in checkpoints[1:]:
        for t in tensors:
            a, b = first.tensors.get(t), ck.tensors.get(t)
            vocab_rows = layout.group_of(t) == "embed" and a and b and a.shape[1:] == b.shape[1:]
            if b is None or (a.shape != b.shape and not vocab_rows):
                raise SimilarityError(
                    f"{ck.uri}: tensor {t!r} missing or shaped differently than in {first.uri}; "
                    "similarity is only defined within one architecture"
                )
            if a.shape != b.shape:
                rows[t] = min(rows.get(t, a.shape[0]), b.shape[0])
    return rows


def sketch_similarity(
    sketches: Mapping[str, Mapping[str, torch.Tensor]],
    layout: Layout,
    *,
    groups: Iterable[str] = DEFAULT_GROUPS,
    pairs: Iterable[tuple[str, str]] | None = None,
    base: tuple[str, Mapping[str, torch.Tensor]] | None = None,
) -> SimilarityResult:
    """The same metrics as :func:`pairwise_similarity`, estimated from the models'
    sketches (:mod:`model_glue.sketch`): no checkpoint is read. ``layout``: the models'
    architecture; ``base``: (name, sketch) for task-vector cosine."""
    groups = list(groups)
    names = sorted(sketches)
    wanted = _wanted(names, pairs)
    tensors = select_tensors(layout, groups)
    if not tensors:
        raise SimilarityError(f"no {'/'.join(groups)} tensors to compare ({layout.describe()})")
    for m in {x for p in wanted for x in p}:
        if missing := [t for t in tensors if t not in sketches[m]]:
            raise SimilarityError(f"the sketch of {m} lacks {missing[0]!r}")
    return _similarities(
        names,
        wanted,
        layout,
        tensors,
        groups,
        lambda m, t: sketches[m][t].float(),
        None if base is None else (base[0], lambda t: base[1][t].float()),
        None,
        projected=lambda t: projected_rows(sketches[wanted[0][0]], t),
    )


def _wanted(names: list[str], pairs: Iterable[tuple[str, str]] | None) -> list[tuple[str, str]]:
    wanted = sorted(
        {tuple(sorted(p)) for p in pairs} if pairs is not None else combinations(names, 2)
    )
    missing = {m for p in wanted for m in p} - set(names)
    if missing:
        raise KeyError(f"pairs name unknown model(s): {sorted(missing)}")
    return wanted  # type: ignore[return-value]


def _similarities(
    names: list[str],
    wanted: list[tuple[str, str]],
    layout: Layout,
    tensors: list[str],
    groups: list[str],
    columns_of: Callable[[str, str], torch.Tensor],
    base: tuple[str, Callable[[str], torch.Tensor]] | None,
    progress: Callable[[int, int], None] | None,
    projected: Callable[[str], int | None] = lambda t: None,
) -> SimilarityResult:
    """The one pass behind both: ``columns_of(model, tensor)`` gives ``[out, in]`` input
    columns (a checkpoint's, or a sketch's ``[k, in]``), or a 1-D tensor as it is."""
    involved = sorted({m for p in wanted for m in p})
    result = SimilarityResult(names=names, tensors=tensors, groups=groups, base=None)
    result.layers = {t: layout.layer_of(t) for t in tensors}
    result.base = base[0] if base is not None else None
    idx = {m: i for i, m in enumerate(involved)}
    n = len(involved)
    flat = torch.zeros(n, n, dtype=torch.float64)
    task = torch.zeros(n, n, dtype=torch.float64)
    col_sum = {g: torch.zeros(n, n, dtype=torch.float64) for g in groups}
    col_count = dict.fromkeys(groups, 0)
    per_tensor_cos: dict[str, torch.Tensor] = {}
    for k, t in enumerate(tensors):
        stack = torch.stack([columns_of(m, t) for m in involved])
        if stack.dim() == 3:
            cos = column_cosine_gram(stack, projected(t))
        else:
            cos = _cos_from_gram(_flat_gram(stack))
        per_tensor_cos[t] = cos
        g = layout.group_of(t)
        col_sum[g] += cos
        col_count[g] += 1
        flat += _flat_gram(stack)
        if base is not None:
            task += _flat_gram(stack - base[1](t)[None])
        del stack
        if progress:
            progress(k + 1, len(tensors))
    all_sum = sum(col_sum.values())
    all_count = sum(col_count.values())
    flat_cos = _cos_from_gram(flat)
    task_cos = _cos_from_gram(task) if base is not None else None
    for a, b in wanted:
        i, j = idx[a], idx[b]
        row = {"sim_all": float(all_sum[i, j] / all_count), "flat_cosine": float(flat_cos[i, j])}
        for g in groups:
            if col_count[g]:
                row[f"sim_{g}"] = float(col_sum[g][i, j] / col_count[g])
        if task_cos is not None:
            row["task_vector_cosine"] = float(task_cos[i, j])
        result.summary[(a, b)] = row
        result.per_tensor[(a, b)] = {t: float(c[i, j]) for t, c in per_tensor_cos.items()}
    return result


def sketch_matrices(
    names: list[str],
    load: Callable[[str], Mapping[str, torch.Tensor]],
    layout: Layout,
    *,
    groups: Iterable[str] = DEFAULT_GROUPS,
    block: int = 64,
    workdir: str | None = None,
    per_tensor: bool = False,
) -> dict[str, torch.Tensor]:
    """Every pair's ``sim_<group>``, ``sim_all`` and ``flat_cosine`` of ``names`` from their
    sketches, as ``[N, N]`` float32 matrices, in memory bounded whatever N (with
    ``per_tensor``, also each tensor's mean column cosine, under the tensor's name).

    Each model becomes one vector per tensor, its sketch's columns unit-normalised and
    scaled so that the inner product of two vectors is the tensor's mean column cosine
    (corrected for the projection's bias, :func:`~model_glue.sketch.debias`, applied to the
    mean), and one raw vector for flat cosine; the vectors go to memory-mapped files (under
    ``workdir``, default a temporary folder) and the Gram matrices are computed block by
    block of ``block`` models. ``load(name)`` gives a model's sketch; each is read once."""
    import tempfile

    import numpy as np

    groups = list(groups)
    tensors = select_tensors(layout, groups)
    if not tensors:
        raise SimilarityError(f"no {'/'.join(groups)} tensors to compare ({layout.describe()})")
    n = len(names)
    projected: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        vectors: dict[str, np.memmap] = {}

        def put(key: str, i: int, v: torch.Tensor) -> None:
            if key not in vectors:
                vectors[key] = np.lib.format.open_memmap(
                    f"{tmp}/{len(vectors)}.npy", mode="w+", dtype=np.float32, shape=(n, v.numel())
                )
            vectors[key][i] = v.numpy()

        for i, name in enumerate(names):
            sketch = load(name)
            flat = []
            for t in tensors:
                s = sketch[t].float()
                projected.setdefault(t, projected_rows(sketch, t))
                unit = s / s.norm(dim=0, keepdim=True).clamp_min(1e-12)
                put(t, i, (unit / math.sqrt(s.shape[1])).reshape(-1))
                flat.append(s.reshape(-1))
            v = torch.cat(flat)
            put("#flat", i, v / v.norm().clamp_min(1e-30))
        grams = {key: torch.zeros(n, n, dtype=torch.float32) for key in vectors}
        for i0 in range(0, n, block):
            for key, vec in vectors.items():
                a = torch.from_numpy(np.asarray(vec[i0 : i0 + block]))
                for j0 in range(i0, n, block):
                    b = a if j0 == i0 else torch.from_numpy(np.asarray(vec[j0 : j0 + block]))
                    g = a @ b.T
                    if j0 == i0:  # BLAS need not return a bitwise symmetric a @ a.T
                        g = (g + g.T) / 2
                    grams[key][i0 : i0 + block, j0 : j0 + block] = g
                    grams[key][j0 : j0 + block, i0 : i0 + block] = g.T
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for t in tensors:
        g = layout.group_of(t)
        cos = grams[t] if projected[t] is None else debias(grams[t].clamp(-1, 1), projected[t])
        out[f"sim_{g}"] = out.get(f"sim_{g}", 0) + cos
        if per_tensor:
            out[t] = cos
        counts[g] = counts.get(g, 0) + 1
    out["sim_all"] = sum(out[f"sim_{g}"] for g in counts) / sum(counts.values())
    for g, c in counts.items():
        out[f"sim_{g}"] = out[f"sim_{g}"] / c
    out["flat_cosine"] = grams["#flat"]
    return out
