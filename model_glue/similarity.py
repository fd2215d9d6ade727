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
    memory: int = 512 * 1024 * 1024,
    workdir: str | None = None,
    per_tensor: bool = False,
) -> dict[str, torch.Tensor]:
    """Every pair's ``sim_<group>``, ``sim_all`` and ``flat_cosine`` of ``names`` from their
    sketches, as ``[N, N]`` float32 matrices, in memory bounded whatever N (with
    ``per_tensor``, also each tensor's mean column cosine, under the tensor's name).

    Each model's sketch of each tensor goes to one file per tensor (under ``workdir``,
    default a temporary folder), in float16 scaled by its largest value (the scale kept
    aside, for flat cosine); each file is then read back block by block with explicit reads,
    not mapped: the files' pages are the kernel's cache, not this process's memory. Four
    blocks of ``block`` models (fewer where they would pass ``memory`` bytes, float32, raw
    and with unit columns) are held while the following models stream past them ``block``
    at a time: per tensor, the inner products
    of unit columns scaled by ``1/sqrt(columns)`` give the mean column cosine (corrected for
    the projection's bias, :func:`~model_glue.sketch.debias`, applied to the mean), and the
    raw inner products, summed over tensors, flat cosine. ``load(name)`` gives a model's
    sketch; each is read once."""
    import tempfile

    import numpy as np

    groups = list(groups)
    tensors = select_tensors(layout, groups)
    if not tensors:
        raise SimilarityError(f"no {'/'.join(groups)} tensors to compare ({layout.describe()})")
    n = len(names)
    projected: dict[str, int | None] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    scales = np.ones((len(tensors), n), dtype=np.float64)
    grams = {t: torch.zeros(n, n, dtype=torch.float32) for t in tensors}
    flat = torch.zeros(n, n, dtype=torch.float64)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        files = [open(f"{tmp}/{k}.f16", "wb") for k in range(len(tensors))]  # noqa: SIM115
        try:
            for i, name in enumerate(names):
                sketch = load(name)
                for k, t in enumerate(tensors):
                    s = sketch[t].float()
                    if t not in shapes:
                        shapes[t], projected[t] = tuple(s.shape), projected_rows(sketch, t)
                    elif tuple(s.shape) != shapes[t]:
                        raise SimilarityError(
                            f"the sketch of {name} holds {t!r} as {list(s.shape)}, another "
                            f"model's as {list(shapes[t])}: sketches of different settings or "
                            "versions do not compare (fingerprint the models again)"
                        )
                    top = float(s.abs().max()) if s.numel() else 0.0
                    scale = top if math.isfinite(top) and top > 0 else 1.0
                    scales[k, i] = scale
                    files[k].write((s / scale).to(torch.float16).numpy())
                del sketch
        finally:
            for f in files:
                f.close()
        for k, t in enumerate(tensors):
            _block_grams(f"{tmp}/{k}.f16", n, shapes[t], block, memory, grams[t], flat, scales[k])
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
    out["flat_cosine"] = _cos_from_gram(flat).float()
    return out


def _block_grams(
    path: str,
    n: int,
    shape: tuple[int, ...],
    block: int,
    memory: int,
    gram: torch.Tensor,
    flat: torch.Tensor,
    scales,
) -> None:
    """One tensor's file of ``n`` float16 sketches of ``shape`` (``[rows, columns]``):
    ``gram`` gets the mean column cosine of every pair, ``flat`` adds the raw inner
    products (times the two sketches' ``scales``)."""
    import numpy as np

    numel = math.prod(shape)
    cols = shape[-1] if len(shape) > 1 else 1
    # models held (raw + unit, float32): 4 blocks, fewer where ``memory`` says so
    held = max(block, min(n, 4 * block, memory // max(1, 8 * numel)))
    scale = torch.from_numpy(scales)

    def read(i0: int, count: int) -> torch.Tensor:
        count = min(count, n - i0)
        raw = np.fromfile(path, dtype=np.float16, count=count * numel, offset=2 * i0 * numel)
        return torch.from_numpy(raw).float().reshape(count, *shape)

    def unit(raw: torch.Tensor) -> torch.Tensor:
        if raw.dim() == 2:  # a 1-D tensor: compared as one vector
            return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)
        norms = raw.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (raw / (norms * math.sqrt(cols))).reshape(raw.shape[0], -1)

    def put(i0: int, j0: int, g: torch.Tensor, raw: torch.Tensor) -> None:
        i1, j1 = i0 + g.shape[0], j0 + g.shape[1]
        gram[i0:i1, j0:j1] = g
        gram[j0:j1, i0:i1] = g.T
        f = raw.double() * (scale[i0:i1, None] * scale[None, j0:j1])  # symmetric
        flat[i0:i1, j0:j1] += f
        if j0 != i0:
            flat[j0:j1, i0:i1] += f.T

    for i0 in range(0, n, held):
        a_raw = read(i0, held)
        a_flat = a_raw.reshape(a_raw.shape[0], -1)
        a_unit = unit(a_raw)
        # BLAS need not return a bitwise symmetric a @ a.T
        g, r = a_unit @ a_unit.T, a_flat @ a_flat.T
        put(i0, i0, (g + g.T) / 2, (r + r.T) / 2)
        for j0 in range(i0 + a_raw.shape[0], n, block):
            b_raw = read(j0, block)
            b_flat = b_raw.reshape(b_raw.shape[0], -1)
            r = a_flat @ b_flat.T
            put(i0, j0, a_unit @ unit(b_raw).T, r)
        del a_raw, a_flat, a_unit
