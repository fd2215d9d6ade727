"""Slices: layers of one or several models stacked into a new model (mergekit's
``slices:``; depth up-scaling as SOLAR did, and frankenmerges).

A stack is a list of output slices. Each slice takes the same number of consecutive
layers from each of its sources (``layer_range: [start, end)``) and merges them layer by
layer with the slice's method (``passthrough`` for a single source: the layers as they
are); its output layers follow the previous slice's. As in mergekit:

- the tensors before the layers (embeddings) are merged over the first slice's sources,
  those after them (final norm, head) over the last slice's, with those slices' settings;
- a parameter is looked up on the source, then the slice, then the config's
  ``parameters``; gradients run over each slice's layers (``t = i / (n - 1)``, and 1 for
  a one-layer slice), the tensors outside the layers take ``t = 0``;
- the config and tokenizer come from ``base_model``, else from the first slice's first
  source, with the new layer count.

Beyond mergekit: a slice may name its own ``merge_method``, and the config's per-layer
fields (``layer_types`` and any list with one entry per layer) are rebuilt from the
layers each output layer came from, so that sliding-window or no-RoPE layers keep theirs.

Every slice streams through the engine (:mod:`model_glue.merge.engine`) into one
sharded writer: memory stays at a few tensors whatever the depth.
"""

from __future__ import annotations

import copy
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from model_glue.checkpoint import Checkpoint
from model_glue.merge.engine import (
    MergeResult,
    _numel,
    _stream,
    choose_workers,
    output_config,
    tensor_values,
    vocab_size,
    write_config_files,
)
from model_glue.merge.io import OutputTensor, ShardedWriter
from model_glue.merge.params import MergeConfigError, check_setting
from model_glue.merge.plan import InputLayout, MergeInputError, plan_merge
from model_glue.merge.registry import get_method
from model_glue.merge.spec import DTYPES, ENGINE_VERSION, dtype_name
from model_glue.merge.threads import torch_threads

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class SliceSource:
    uri: str
    start: int
    end: int
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    method: str | None = None  # default: the stack's

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass(frozen=True)
class StackSpec:
    """A stacked merge, validated on creation (errors name the slice and the key)."""

    method: str
    slices: tuple[OutputSlice, ...]
    base: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None

    def __post_init__(self) -> None:
        if not self.slices:
            raise MergeConfigError("slices: give at least one slice")
        for i, s in enumerate(self.slices):
            where = f"slices[{i}]"
            if not s.sources:
                raise MergeConfigError(f"{where}.sources: give at least one source")
            lengths = {src.length for src in s.sources}
            if len(lengths) != 1:
                raise MergeConfigError(
                    f"{where}: every source must give the same number of layers, got "
                    f"{sorted(lengths)}"
                )
            for j, src in enumerate(s.sources):
                if src.start < 0 or src.end <= src.start:
                    raise MergeConfigError(
                        f"{where}.sources[{j}].layer_range: [{src.start}, {src.end}] is empty"
                    )
            method = get_method(self.method_of(s))
            base = self.base_of(s)
            models = self.models_of(s)
            if method.base == "required" and base not in {src.uri for src in s.sources}:
                raise MergeConfigError(
                    f"{where}: merge method {method.name!r} needs the base model among the "
                    "slice's sources (its layers are the base's)"
                )
            try:
                method.check_inputs(len(models), base is not None and method.base != "none")
                for key, setting in {**self.params, **s.params}.items():
                    check_setting(method.param(key), setting, f"parameters.{key}")
                for src in s.sources:
                    for key, setting in src.params.items():
                        check_setting(method.param(key), setting, f"parameters.{key}")
            except MergeConfigError as e:
                raise MergeConfigError(f"{where}: {e}") from None
        dtype_name(self.dtype)

    def method_of(self, s: OutputSlice) -> str:
        return s.method or self.method

    def base_of(self, s: OutputSlice) -> str | None:
        return s.base or self.base

    def models_of(self, s: OutputSlice) -> list[SliceSource]:
        """The slice's sources other than its base (a base listed among the sources, as
        mergekit configs do, enters as the base only)."""
        base = self.base_of(s)
        if get_method(self.method_of(s)).base == "none":
            return list(s.sources)
        return [src for src in s.sources if src.uri != base]

    @property
    def num_layers(self) -> int:
        return sum(s.length for s in self.slices)

    @property
    def reference(self) -> str:
        """Where the config and tokenizer come from."""
        return self.base or self.slices[0].sources[0].uri

    def to_config(self) -> dict:
        """The mergekit-style YAML of this stack (written beside the model)."""

        def source(src: SliceSource) -> dict:
            out: dict[str, Any] = {"model": src.uri, "layer_range": [src.start, src.end]}
            return out | ({"parameters": dict(src.params)} if src.params else {})

        slices = []
        for s in self.slices:
            entry: dict[str, Any] = {"sources": [source(src) for src in s.sources]}
            for key, value in (("base_model", s.base), ("merge_method", s.method)):
                if value:
                    entry[key] = value
            if s.params:
                entry["parameters"] = dict(s.params)
            slices.append(entry)
        out: dict[str, Any] = {"merge_method": self.method, "slices": slices}
        if self.base:
            out["base_model"] = self.base
        if self.params:
            out["parameters"] = dict(self.params)
        if self.dtype:
            out["dtype"] = self.dtype
        return out


def parse_slices(data: Mapping[str, Any], resolve: Callable[[Any, str], str]) -> StackSpec:
    """A mergekit config with ``slices:`` (``resolve(path, key)`` resolves model paths)."""
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise MergeConfigError("slices: expected a non-empty list")
    out = []
    for i, s in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(s, Mapping) or "sources" not in s:
            raise MergeConfigError(f"{where}: expected a mapping with 'sources'")
        extra = set(s) - {"sources", "base_model", "parameters", "merge_method"}
        if extra:
            raise MergeConfigError(f"{where}: unknown keys {sorted(extra)}")
        sources = []
        for j, src in enumerate(s["sources"] or []):
            key = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                raise MergeConfigError(f"{key}: expected a mapping with 'model' and 'layer_range'")
            if extra := set(src) - {"model", "layer_range", "parameters"}:
                raise MergeConfigError(f"{key}: unknown keys {sorted(extra)}")
            lr = src["layer_range"]
            if not (
                isinstance(lr, list | tuple) and len(lr) == 2 and all(type(x) is int for x in lr)
            ):
                raise MergeConfigError(f"{key}.layer_range: expected [start, end], got {lr!r}")
            sources.append(
                SliceSource(
                    resolve(src["model"], f"{key}.model"),
                    lr[0],
                    lr[1],
                    dict(src.get("parameters") or {}),
                )
            )
        base = s.get("base_model")
        out.append(
            OutputSlice(
                tuple(sources),
                resolve(base, f"{where}.base_model") if base else None,
                dict(s.get("parameters") or {}),
                s.get("merge_method"),
            )
        )
    base = data.get("base_model")
    return StackSpec(
        method=data["merge_method"],
        slices=tuple(out),
        base=resolve(base, "base_model") if base else None,
        params=dict(data.get("parameters") or {}),
        dtype=data.get("out_dtype") or data.get("dtype"),
    )


@dataclass
class _Segment:
    """One part of the output merged by one plan: a slice's layers, or the tensors
    before (``pre``) or after (``post``) the layers."""

    plan: Any
    checkpoints: list[Checkpoint]
    values: list[dict | None]


def stack_to_directory(
    spec: StackSpec,
    out_dir: str | Path,
    *,
    shard_size: int = 2 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    workers: int | None = None,
) -> MergeResult:
    """Write the stack ``spec`` describes as a Hugging Face directory at ``out_dir``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: output directory already exists")
    opened: dict[str, Checkpoint] = {}

    def open_(uri: str) -> Checkpoint:
        if uri not in opened:
            opened[uri] = Checkpoint(uri)
        return opened[uri]

    for i, s in enumerate(spec.slices):
        for j, src in enumerate(s.sources):
            have = open_(src.uri).layout.num_layers
            if src.end > have:
                raise MergeInputError(
                    f"slices[{i}].sources[{j}]: layer_range [{src.start}, {src.end}] is past "
                    f"the {have} layers of {src.uri}"
                )
    segments = _segments(spec, open_)
    jobs = [job for seg in segments for job in seg.plan.jobs]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    writer = ShardedWriter(
        tmp, [OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], shard_size
    )
    try:
        done = 0
        for seg in segments:
            n = len(seg.plan.jobs)
            report = None
            if progress is not None:
                report = lambda k, _n, base=done: progress(base + k, len(jobs))  # noqa: E731
            w = workers or choose_workers(seg.plan, seg.checkpoints)
            with torch_threads(threads or max(1, (torch.get_num_threads() - 1) // w)):
                _stream(seg.plan, seg.checkpoints, seg.values, writer, report, w)
            done += n
        writer.finish()
        writer.close()
        _write_metadata(spec, open_, segments, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out_dtype = segments[0].plan.out_dtype
    return MergeResult(
        out_dir=out_dir,
        method=spec.method,
        canonical=spec.to_config(),
        content_key=None,
        num_tensors=len(jobs),
        num_parameters=sum(_numel(j.shape) for j in jobs),
        dtype=dtype_name(out_dtype),
        shards=tuple(writer.names),
        seconds=time.perf_counter() - start,
        workers=workers or 1,
    )


def _segments(spec: StackSpec, open_: Callable[[str], Checkpoint]) -> list[_Segment]:
    """The pre-layer tensors, each slice's layers, the post-layer tensors, in that order."""
    first, last = spec.slices[0], spec.slices[-1]
    segments = [_segment(spec, first, open_, part="pre")]
    offset = 0
    for s in spec.slices:
        segments.append(_segment(spec, s, open_, part="layers", offset=offset))
        offset += s.length
    segments.append(_segment(spec, last, open_, part="post"))
    return [seg for seg in segments if seg.plan.jobs]


def _segment(
    spec: StackSpec,
    s: OutputSlice,
    open_: Callable[[str], Checkpoint],
    *,
    part: str,
    offset: int = 0,
) -> _Segment:
    method = get_method(spec.method_of(s))
    base = spec.base_of(s) if method.base != "none" else None
    models = spec.models_of(s)
    start_of = {src.uri: src.start for src in s.sources}
    inputs = ([base] if base else []) + [src.uri for src in models]
    views = [_view(open_(uri), part, start_of[uri], s.length, offset) for uri in inputs]
    names = [Path(uri).name for uri in inputs]
    names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
    layouts = [
        InputLayout(
            name,
            {n: ti.shape for n, ti in ck.tensors.items()},
            {n: ti.torch_dtype for n, ti in ck.tensors.items()},
            vocab_size(ck.config),
        )
        for name, ck in zip(names, views, strict=True)
    ]
    layout = open_(inputs[0]).layout

    def local_layer(name: str) -> int | None:
        i = layout.layer_of(name)
        return None if i is None else i - offset

    plan = plan_merge(
        method,
        layouts,
        has_base=base is not None,
        reference=0,
        vocab_policy="error",
        out_dtype=DTYPES[dtype_name(spec.dtype)] if spec.dtype else None,
        num_layers=s.length,
        layer_of=local_layer,
    )
    # mergekit's gradient position: over the slice's layers, 1 for a one-layer slice
    plan = replace(
        plan,
        jobs=tuple(replace(j, t=_slice_t(local_layer(j.name), s.length)) for j in plan.jobs),
    )
    values = tensor_values(plan, {**spec.params, **s.params}, [src.params for src in models])
    return _Segment(plan, views, values)


def _slice_t(layer: int | None, length: int) -> float:
    if layer is None:
        return 0.0
    return layer / (length - 1) if length > 1 else 1.0


def _view(ck: Checkpoint, part: str, start: int, length: int, offset: int) -> Checkpoint:
    """``ck`` showing only one part of its tensors, its layers renamed to their output
    positions (``start + i`` becomes ``offset + i``); the data is read from ``ck``'s files."""
    layout = ck.layout
    tensors = {}
    for name, info in ck.tensors.items():
        i = layout.layer_of(name)
        if part == "layers":
            if i is not None and start <= i < start + length:
                old, new = layout.layer_filter(i), layout.layer_filter(offset + i - start)
                tensors[new + name[len(old) :]] = info
        elif i is None and (name in layout.embeddings) == (part == "pre"):
            tensors[name] = info
    view = copy.copy(ck)
    view.__dict__["tensors"] = dict(sorted(tensors.items()))
    view.__dict__.pop("layout", None)
    return view


def _write_metadata(
    spec: StackSpec, open_: Callable[[str], Checkpoint], segments: list[_Segment], tmp: Path
) -> None:
    ref = open_(spec.reference)
    config = stacked_config(output_config(ref, segments[0].plan.out_dtype), spec, open_)
    write_config_files(ref, config, spec.to_config(), tmp)
    rows = "\n".join(
        f"| {o} | {spec.method_of(s)} | "
        + ", ".join(f"`{Path(src.uri).name}` [{src.start}, {src.end})" for src in s.sources)
        + " |"
        for o, s in zip(_offsets(spec), spec.slices, strict=True)
    )
    (tmp / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags: [merge, model-glue, stacked]\n---\n\n"
        f"# Stacked model ({spec.num_layers} layers)\n\n"
        f"Written by model-glue (merge engine {ENGINE_VERSION}) from `slices:`; the config "
        "is in `merge_config.yaml`.\n\n"
        f"| first output layer | method | sources |\n|---|---|---|\n{rows}\n"
    )


def _offsets(spec: StackSpec) -> list[int]:
    out, o = [], 0
    for s in spec.slices:
        out.append(o)
        o += s.length
    return out


def stacked_config(
    config: Mapping[str, Any], spec: StackSpec, open_: Callable[[str], Checkpoint]
) -> dict:
    """``config`` with the stack's layer count, and every per-layer list field rebuilt
    from the source layer each output layer came from (the first source of its slice)."""
    out = dict(config)
    old = next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            out[key] = spec.num_layers
    if old is None:
        return out
    for key, value in config.items():
        if not (isinstance(value, list) and len(value) == old):
            continue
        rebuilt = []
        for s in spec.slices:
            src = s.sources[0]
            theirs = open_(src.uri).config.get(key)
            if not (isinstance(theirs, list) and len(theirs) >= src.end):
                raise MergeInputError(
                    f"config.json {key!r}: {src.uri} has no entry per layer to stack"
                )
            rebuilt += theirs[src.start : src.end]
        out[key] = rebuilt
    return out
