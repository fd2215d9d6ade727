"""The merge method registry: one declaration per method.

A method is a small function over float32 tensors of one weight,
``fn(base, models, params, ctx) -> Tensor``, registered with :func:`merge_method`
together with its parameter declarations and its rule for the base model. Everything
else (config validation, CLI help, the docs table) reads the declaration.

Contract of ``fn``:
- ``base`` (or None) and ``models`` are float32 tensors *owned by the call*: the
  function may overwrite them in place, which is how the engine avoids allocating a
  full-size temporary per operation;
- ``params`` maps each declared name to its value for this tensor (per-model
  parameters as a tuple, one value per model, in input order);
- ``ctx`` names the tensor and the models (random masks are seeded from these);
- it returns a float32 tensor of the same shape (it may be one of its inputs).

Chunked methods: a method declared ``chunked`` computes output element ``j`` from input
element ``j``, its flat position and, at most, a few per-tensor sums. The streaming engine
then calls it on flat chunks of ``CHUNK`` elements (the last one shorter), so that every
pass over the data runs in cache: ``ctx.offset`` is the chunk's first flat position,
always a multiple of ``CHUNK``. Per-tensor sums come from the method's ``reduce``
function, ``reduce(base, models, params, ctx) -> list[float] | None``: the engine first
calls it on every chunk (with inputs it may overwrite), adds the lists element by element
with ``math.fsum`` and passes the totals to ``fn`` as ``ctx.totals``. ``None`` means
these parameters need no totals, and the engine skips that first pass. Called on a
whole tensor (the in-memory merger does), ``fn`` gets ``offset=0`` and
``totals=None`` and computes what it needs itself; for results identical to the
chunked path it sums over the same ``CHUNK``-aligned blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from model_glue.merge.params import MergeConfigError, Param

BaseRule = Literal["required", "none"]


CHUNK = 1 << 18  # elements per chunk (1 MiB in float32): each pass over a chunk runs in cache


@dataclass(frozen=True)
class TensorContext:
    """Which tensor (and which part of it) a method call is merging.

    ``offset``: flat position of the call's first element (chunked methods only).
    ``totals``: the summed results of the method's ``reduce`` over the whole tensor.
    ``memo``: a dict shared by every ``reduce`` and ``fn`` call on one tensor's chunks
    (the engine makes one per tensor; None for a whole-tensor call), where a method may
    keep what its first pass computed for its second, such as random masks.
    """

    tensor_name: str
    model_names: tuple[str, ...]
    offset: int = 0
    totals: tuple[float, ...] | None = None
    memo: dict | None = field(default=None, compare=False)


MergeFn = Callable[
    [torch.Tensor | None, list[torch.Tensor], Mapping[str, Any], TensorContext], torch.Tensor
]
ReduceFn = Callable[
    [torch.Tensor | None, list[torch.Tensor], Mapping[str, Any], TensorContext],
    list[float] | None,
]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: tuple[Param, ...]
    base: BaseRule
    summary: str
    reference: str
    min_models: int = 1
    max_models: int | None = None
    chunked: bool = False  # may run on chunks: see "Chunked methods" above
    reduce: ReduceFn | None = None  # per-tensor sums a chunked method needs

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        allowed = ", ".join(p.name for p in self.params) or "none"
        raise MergeConfigError(
            f"merge method {self.name!r} has no parameter {name!r} (allowed: {allowed})"
        )

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    def check_inputs(self, num_models: int, has_base: bool) -> None:
        if self.base == "required" and not has_base:
            raise MergeConfigError(f"merge method {self.name!r} needs a base model (set 'base')")
        if self.base == "none" and has_base:
            raise MergeConfigError(
                f"merge method {self.name!r} does not use a base model; list every input under 'models'"
            )
        if num_models < self.min_models:
            raise MergeConfigError(
                f"merge method {self.name!r} needs at least {self.min_models} model(s) besides the base, got {num_models}"
            )
        if self.max_models is not None and num_models > self.max_models:
            raise MergeConfigError(
                f"merge method {self.name!r} takes at most {self.max_models} model(s) besides the base, got {num_models}"
            )

    def help(self) -> str:
        """Text for CLI help and docs, derived from the declaration."""
        base = "needs a base model" if self.base == "required" else "no base model"
        lines = [f"{self.name}: {self.summary} ({base}; {self.reference})"]
        lines += [f"  - {p.describe()}" for p in self.params]
        return "\n".join(lines)


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    params: tuple[Param, ...],
    base: BaseRule,
    summary: str,
    reference: str,
    min_models: int = 1,
    max_models: int | None = None,
    chunked: bool = False,
    reduce: ReduceFn | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn`` under ``name``; duplicate names are programming errors.

    ``chunked`` declares that the engine may call ``fn`` on cache-sized chunks of a
    tensor, after ``reduce`` (if given) has summed what ``fn`` needs over the whole tensor
    (see "Chunked methods" above). A method that needs a per-tensor statistic other
    than a sum, such as a top-k threshold, is not chunked.
    """
    if reduce is not None and not chunked:
        raise ValueError(f"merge method {name!r}: reduce is only used by chunked methods")

    def deco(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(
            name, fn, params, base, summary, reference, min_models, max_models, chunked, reduce
        )
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeConfigError(
            f"unknown merge method {name!r} (available: {', '.join(sorted(METHODS))})"
        ) from None


def methods_help() -> str:
    return "\n\n".join(METHODS[n].help() for n in sorted(METHODS))


def methods_markdown() -> str:
    """The methods reference of docs/merging.md, generated from the declarations."""
    out = []
    for name in sorted(METHODS):
        m = METHODS[name]
        base = "needs a base model" if m.base == "required" else "no base model"
        if m.max_models is None:
            count = f"{m.min_models} or more"
        elif m.max_models == m.min_models:
            count = f"exactly {m.min_models}"
        else:
            count = f"{m.min_models} to {m.max_models}"
        summary = m.summary[0].upper() + m.summary[1:]
        out.append(
            f"### `{name}`\n\n{summary}. {base.capitalize()}; {count} other model(s). {m.reference}\n"
        )
        out.append(
            "| parameter | type | scope | default | allowed | meaning |\n|---|---|---|---|---|---|"
        )
        for p in m.params:
            default = "**required**" if p.required else f"`{p.default!r}`"
            allowed = (
                "/".join(str(c) for c in p.choices)
                if p.choices
                else (
                    f"[{p.minimum}, {p.maximum}]"
                    if p.minimum is not None or p.maximum is not None
                    else ""
                )
            )
            scope = "per model" if p.per_model else "global"
            out.append(
                f"| `{p.name}` | {p.type.__name__} | {scope} | {default} | {allowed} | {p.help} |"
            )
        out.append("")
    return "\n".join(out).strip() + "\n"


Chunk = tuple[torch.Tensor | None, list[torch.Tensor]]


def merge_chunks(
    method: MergeMethod,
    tensor_name: str,
    model_names: tuple[str, ...],
    n: int,
    chunk: Callable[[int, int], Chunk],
    values: Mapping[str, Any],
    out: torch.Tensor,
) -> None:
    """The chunked protocol of the module docstring, for one flat tensor of ``n``
    elements: ``chunk(start, stop)`` gives fresh float32 (base, models) for a range; a
    ``reduce`` pass sums per-tensor totals first when the method has one; every chunk's
    result is written to ``out[start:stop]``. The streaming engine and the in-memory
    merger over lazy inputs both merge through here, so they agree bit for bit."""
    bounds = [(start, min(n, start + CHUNK)) for start in range(0, n, CHUNK)]
    totals = None
    memo: dict = {}
    if method.reduce is not None:
        parts = []
        for start, stop in bounds:
            ctx = TensorContext(tensor_name, model_names, offset=start, memo=memo)
            part = method.reduce(*chunk(start, stop), values, ctx)
            if part is None:  # these parameters need no totals
                break
            parts.append(part)
        else:
            totals = tuple(math.fsum(column) for column in zip(*parts, strict=True))
    for start, stop in bounds:
        ctx = TensorContext(tensor_name, model_names, offset=start, totals=totals, memo=memo)
        out[start:stop].copy_(method.fn(*chunk(start, stop), values, ctx))
