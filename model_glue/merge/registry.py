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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from model_glue.merge.params import MergeConfigError, Param, resolve

# "optional": with a base the method works on task vectors against it, without one on the
# models themselves (mergekit's BasePolicy.OPTIONAL).
BaseRule = Literal["required", "optional", "none"]
BASE_RULES: dict[str, str] = {
    "required": "needs a base model",
    "optional": "base model optional: with one, task vectors against it",
    "none": "no base model",
}


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
# A rule across parameters (say density and epsilon), on one tensor's resolved values
# and the model names; it raises MergeConfigError naming the parameter.
CheckFn = Callable[[Mapping[str, Any], Sequence[str]], None]


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
    check: CheckFn | None = None  # a rule across parameters: see check_settings

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        allowed = ", ".join(p.name for p in self.params) or "none"
        raise MergeConfigError(
            f"merge method {self.name!r} has no parameter {name!r} (allowed: {allowed})"
        )

    def check_settings(
        self,
        params: Mapping[str, Any],
        model_params: Sequence[Mapping[str, Any]],
        names: Sequence[str],
    ) -> None:
        """Run ``check`` at configuration time on every value a tensor can get, as far
        as that is known without tensor names: scalars, and gradients at each of their
        breakpoints. Filtered settings, and gradients whose rule holds at the breakpoints
        but not between them, are caught per tensor by the planner, before any tensor is
        read. Missing required parameters are left to the caller's own check."""
        if self.check is None:
            return
        settings = [params.get(p.name) for p in self.params]
        settings += [mp.get(p.name) for mp in model_params for p in self.per_model_params]
        if any(_filtered(s) for s in settings):
            return
        ts = {0.0, 1.0}
        for s in settings:
            if isinstance(s, list) and len(s) > 1:
                ts.update(i / (len(s) - 1) for i in range(len(s)))
        for t in sorted(ts):
            values: dict[str, Any] = {}
            for p in self.params:
                g = params.get(p.name)
                if p.per_model:
                    chosen = [mp.get(p.name, g) for mp in model_params]
                    if p.required and any(c is None for c in chosen):
                        return
                    values[p.name] = tuple(
                        resolve(p, (c,), "", t, n) for c, n in zip(chosen, names, strict=True)
                    )
                else:
                    if p.required and g is None:
                        return
                    values[p.name] = resolve(p, (g,), "", t, "params")
            self.check(values, names)

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

    @property
    def search_refusal(self) -> str | None:
        """Why the search cannot tune this method, or None when it can. A search sets each
        model's ``weight`` and merges any subset of a cluster, from one model up."""
        if not any(p.name == "weight" and p.per_model for p in self.params):
            return "it has no per-model weight to set"
        if self.max_models == self.min_models:
            n = self.min_models
            return f"it takes exactly {n} model{'s' if n > 1 else ''}"
        if self.min_models > 1:
            return f"it needs at least {self.min_models} models (a search starts from one)"
        if self.max_models is not None:
            return f"it takes at most {self.max_models} models"
        return None

    def help(self) -> str:
        """Text for CLI help and docs, derived from the declaration."""
        base = BASE_RULES[self.base]
        refusal = f"; not searchable: {self.search_refusal}" if self.search_refusal else ""
        lines = [f"{self.name}: {self.summary} ({base}; {self.reference}{refusal})"]
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
    check: CheckFn | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn`` under ``name``; duplicate names are programming errors.

    ``chunked`` declares that the engine may call ``fn`` on cache-sized chunks of a
    tensor, after ``reduce`` (if given) has summed what ``fn`` needs over the whole tensor
    (see "Chunked methods" above). A method that needs a per-tensor statistic other
    than a sum, such as a top-k threshold, is not chunked. ``check``: a rule across
    parameters, run on every tensor's values before the merge starts.
    """
    if reduce is not None and not chunked:
        raise ValueError(f"merge method {name!r}: reduce is only used by chunked methods")

    def deco(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(
            name,
            fn,
            params,
            base,
            summary,
            reference,
            min_models,
            max_models,
            chunked,
            reduce,
            check,
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
        base = BASE_RULES[m.base]
        if m.max_models is None:
            count = f"{m.min_models} or more"
        elif m.max_models == m.min_models:
            count = f"exactly {m.min_models}"
        else:
            count = f"{m.min_models} to {m.max_models}"
        summary = m.summary[0].upper() + m.summary[1:]
        refusal = f" Not searchable: {m.search_refusal}." if m.search_refusal else ""
        out.append(
            f"### `{name}`\n\n{summary}. {base[0].upper() + base[1:]}; {count} other model(s).{refusal} {m.reference}\n"
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


def _filtered(setting: Any) -> bool:
    """A setting with ``{filter, value}`` entries: its value depends on the tensor name."""
    if isinstance(setting, Mapping):
        return True
    return isinstance(setting, list) and any(isinstance(e, Mapping) for e in setting)
