"""Per-tensor planning shared by the streaming and the in-memory merge.

Given what each input holds (names, shapes, dtypes, vocabulary size), decide for every
output tensor its shape and dtype, whether it is merged or copied (non-float buffers come
from the reference input), how vocabulary rows are aligned, and which parameter values
apply to it. All of it is checked before any tensor is read, so bad inputs fail fast with
an error that names the model and the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from model_glue.architectures import infer_layout
from model_glue.errors import InputError
from model_glue.merge.params import MergeConfigError, depth_position, resolve
from model_glue.merge.registry import MergeMethod

if TYPE_CHECKING:
    from model_glue.merge.tokenizer import MergedVocabulary


class MergeInputError(InputError):
    """The inputs cannot be merged: missing tensors, shape or vocabulary mismatch."""


@dataclass(frozen=True)
class InputLayout:
    """What the planner needs to know about one input model."""

    name: str
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype]
    vocab_size: int | None = None


@dataclass(frozen=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merge: bool  # False: copied from the reference input (integer/bool buffers)
    rows: int | None  # output vocabulary rows (inputs cut, padded or permuted); None: as is
    t: float  # depth position for gradient settings


@dataclass(frozen=True)
class VocabAlignment:
    policy: str  # error / truncate / pad, or "tokenizer" (rows permuted by ``vocabulary``)
    rows: int | None  # output vocabulary size when inputs differ, else None
    sizes: Mapping[str, int]  # input name -> rows found
    vocabulary: MergedVocabulary | None = None

    def describe(self) -> str:
        if self.vocabulary is not None:
            return self.vocabulary.describe()
        if self.rows is None:
            return "all inputs share one vocabulary size"
        how = (
            "truncated"
            if self.policy == "truncate"
            else "truncated or padded with the reference's rows"
        )
        sizes = ", ".join(f"{k}: {v}" for k, v in self.sizes.items())
        return f"embedding/lm_head rows {how} to {self.rows} ({sizes})"


@dataclass(frozen=True)
class MergePlan:
    method: MergeMethod
    input_names: tuple[str, ...]  # base first when the method uses one
    has_base: bool
    reference: int  # index of the tokenizer/config source in input_names
    jobs: tuple[TensorJob, ...]
    vocab: VocabAlignment
    out_dtype: torch.dtype
    num_layers: int

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.input_names[1:] if self.has_base else self.input_names


def plan_merge(
    method: MergeMethod,
    layouts: Sequence[InputLayout],
    *,
    has_base: bool,
    reference: int,
    vocab_policy: str,
    out_dtype: torch.dtype | None,
    num_layers: int | None,
    layer_of: Callable[[str], int | None] | None = None,
    vocabulary: MergedVocabulary | None = None,
    vocab_names: Collection[str] | None = None,
) -> MergePlan:
    """``layer_of``: a tensor's decoder layer (the inputs' :class:`Layout`); by default
    a layout inferred from the reference input's tensor names.

    ``vocabulary`` (a merged vocabulary, inputs in ``layouts`` order): the embedding and
    lm_head rows are permuted to it instead of the ``vocab_policy``; those tensors are
    ``vocab_names`` (the token embedding and the head), by default every tensor outside
    the decoder layers whose rows are each input's vocabulary size."""
    ref = layouts[reference]
    names = sorted(ref.shapes)
    for lay in layouts:
        missing = sorted(set(names) - set(lay.shapes))
        extra = sorted(set(lay.shapes) - set(names))
        if missing or extra:
            detail = f"lacks {missing[:5]}" if missing else f"has extra tensors {extra[:5]}"
            raise MergeInputError(f"model {lay.name!r} {detail} compared to {ref.name!r}")
    if layer_of is None:
        layer_of = infer_layout({}, ref.shapes).layer_of
    permuted: set[str] = set()
    if vocabulary is not None and not vocabulary.identity:
        permuted = _vocabulary_tensors(names, layouts, vocabulary, layer_of, vocab_names)
    vocab_tensors = {}
    for n in names:
        shapes = {lay.name: lay.shapes[n] for lay in layouts}
        if n in permuted or len(set(shapes.values())) == 1:
            continue
        if vocabulary is None and _is_vocab_axis(n, layouts):
            vocab_tensors[n] = shapes
        else:
            pretty = ", ".join(f"{k}: {tuple(v)}" for k, v in shapes.items())
            raise MergeInputError(f"tensor {n!r} has different shapes across inputs ({pretty})")
    if vocabulary is not None:
        sizes = {lay.name: r for lay, r in zip(layouts, vocabulary.input_rows, strict=True)}
        vocab = VocabAlignment(
            "tokenizer", vocabulary.rows if permuted else None, sizes, vocabulary
        )
        vocab_tensors = dict.fromkeys(permuted)
    else:
        vocab = _align_vocab(vocab_tensors, layouts, reference, vocab_policy)
    if out_dtype is None:
        out_dtype = _dominant_float_dtype(ref)
    if num_layers is None:
        found = [i for i in (layer_of(n) for n in names) if i is not None]
        num_layers = max(found) + 1 if found else 0
    jobs = []
    for n in names:
        shape = tuple(ref.shapes[n])
        merge = ref.dtypes[n].is_floating_point
        rows = vocab.rows if n in vocab_tensors else None
        if rows is not None:
            shape = (rows, *shape[1:])
        jobs.append(
            TensorJob(
                n,
                shape,
                out_dtype if merge else ref.dtypes[n],
                merge,
                rows,
                depth_position(layer_of(n), num_layers),
            )
        )
    return MergePlan(
        method,
        tuple(lay.name for lay in layouts),
        has_base,
        reference,
        tuple(jobs),
        vocab,
        out_dtype,
        num_layers,
    )


def _is_vocab_axis(name: str, layouts: Sequence[InputLayout]) -> bool:
    """Rows differ and each input's row count is its own vocabulary size."""
    shapes = [lay.shapes[name] for lay in layouts]
    if len({len(s) for s in shapes}) != 1 or len({tuple(s[1:]) for s in shapes}) != 1:
        return False
    return all(
        lay.vocab_size is not None and lay.shapes[name][0] == lay.vocab_size for lay in layouts
    )


def _vocabulary_tensors(
    names: Sequence[str],
    layouts: Sequence[InputLayout],
    vocabulary: MergedVocabulary,
    layer_of: Callable[[str], int | None],
    vocab_names: Collection[str] | None,
) -> set[str]:
    """The tensors whose rows are tokens (with their biases), each checked: rows = the
    input's vocabulary size, other dimensions alike."""
    sizes = vocabulary.input_rows
    if vocab_names is None:
        outside = [n for n in names if layer_of(n) is None and len(layouts[0].shapes[n]) == 2]
        vocab_names = [
            n
            for n in outside
            if all(lay.shapes[n][0] == r for lay, r in zip(layouts, sizes, strict=True))
        ]
    out = {n for n in vocab_names if n in names}
    out |= {b for n in out if (b := n.removesuffix(".weight") + ".bias") in names}
    if not out:
        raise MergeInputError("no embedding or lm_head tensor found to permute to the vocabulary")
    for n in sorted(out):
        shapes = [tuple(lay.shapes[n]) for lay in layouts]
        for lay, shape, rows in zip(layouts, shapes, sizes, strict=True):
            if shape[0] != rows:
                raise MergeInputError(
                    f"tensor {n!r} of {lay.name!r} has {shape[0]} rows but its vocabulary has {rows}"
                )
        if len({s[1:] for s in shapes}) != 1:
            pretty = ", ".join(f"{lay.name}: {s}" for lay, s in zip(layouts, shapes, strict=True))
            raise MergeInputError(f"tensor {n!r} has different shapes across inputs ({pretty})")
    return out


def _align_vocab(
    vocab_tensors: Mapping[str, Mapping[str, tuple[int, ...]]],
    layouts: Sequence[InputLayout],
    reference: int,
    policy: str,
) -> VocabAlignment:
    if not vocab_tensors:
        return VocabAlignment(policy, None, {})
    sizes = {lay.name: int(lay.vocab_size) for lay in layouts}
    ref = layouts[reference]
    rows = sizes[ref.name]
    pretty = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    tensors = ", ".join(sorted(vocab_tensors))
    if policy == "error":
        raise MergeInputError(
            f"vocabulary sizes differ ({pretty}) in {tensors}; set vocab: truncate (cut every "
            f"input to the tokenizer source {ref.name!r}, {rows} rows) or vocab: pad (also fill "
            "missing rows from it)"
        )
    if policy == "truncate":
        short = {k: v for k, v in sizes.items() if v < rows}
        if short:
            raise MergeInputError(
                f"vocab: truncate cuts to {rows} rows ({ref.name!r}) but {sorted(short)} have fewer; use vocab: pad"
            )
    return VocabAlignment(policy, rows, sizes)


def _dominant_float_dtype(layout: InputLayout) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for n, dt in layout.dtypes.items():
        if dt.is_floating_point:
            numel = 1
            for s in layout.shapes[n]:
                numel *= s
            counts[dt] = counts.get(dt, 0) + numel
    return max(counts, key=counts.get) if counts else torch.float32


def resolve_tensor_params(
    method: MergeMethod,
    job: TensorJob,
    global_settings: Mapping[str, Any],
    model_settings: Sequence[Mapping[str, Any]],
    model_names: Sequence[str],
) -> dict[str, Any]:
    """Parameter values for one tensor: per-model first, then global, then default;
    checked by the method's rule across parameters, if it has one."""
    out: dict[str, Any] = {}
    for p in method.params:
        g = global_settings.get(p.name)
        if p.per_model:
            out[p.name] = tuple(
                resolve(p, (ms.get(p.name), g), job.name, job.t, f"model {i}")
                for i, ms in enumerate(model_settings)
            )
        else:
            out[p.name] = resolve(p, (g,), job.name, job.t, "params")
    if method.check is not None:
        try:
            method.check(out, model_names)
        except MergeConfigError as e:
            raise MergeConfigError(f"tensor {job.name!r}: {e}") from None
    return out


def align_rows(tensor: torch.Tensor, rows: int, fill: torch.Tensor | None) -> torch.Tensor:
    """Cut ``tensor`` to ``rows`` rows, or extend it with the matching rows of ``fill``."""
    have = tensor.shape[0]
    if have >= rows:
        return tensor[:rows]
    if fill is None or fill.shape[0] < rows:
        raise MergeInputError(f"cannot pad {have} rows to {rows}: the reference has too few rows")
    return torch.cat([tensor, fill[have:rows].to(tensor.dtype)])
