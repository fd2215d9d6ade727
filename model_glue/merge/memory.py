"""In-memory merging of resident state dicts, for the search loop (no disk).

``Merger`` checks and plans once (names, shapes, vocabulary, dtypes) and keeps copies of
the inputs (16-bit floats as they are, anything else as float32); each call then only
resolves the new coefficients and runs the method per tensor, on float32 copies made one
tensor at a time. On the ~1.1M-parameter demo models a call costs milliseconds, so a
search can afford hundreds of them.

    merger = Merger("ties", [sd_a, sd_b], base=sd_base, params={"density": 0.5})
    merged = merger(model_params=[{"weight": 0.7}, {"weight": 0.3}])
    merged = merger(params={"density": 0.3})  # same inputs, new coefficients

Inputs that are :class:`~model_glue.checkpoint.LazyTensors` are not kept: each call reads
the tensors it merges from disk (the page cache) one tensor at a time, and
:meth:`Merger.merge_into` writes each merged tensor straight into a model's own weights, so
a search over a cluster of N models holds one model plus N copies of one tensor, whatever N.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from model_glue.checkpoint import LazyTensors, tensor_dtypes, tensor_shapes
from model_glue.merge.params import MergeConfigError, check_setting
from model_glue.merge.plan import (
    InputLayout,
    MergePlan,
    align_rows,
    plan_merge,
    resolve_tensor_params,
)
from model_glue.merge.registry import (
    CHUNK,
    MergeMethod,
    TensorContext,
    get_method,
    merge_chunks,
)
from model_glue.merge.spec import DTYPES, MergeSpec, dtype_name
from model_glue.merge.threads import torch_threads
from model_glue.merge.tokenizer import MergedVocabulary, spec_vocabulary

StateDict = Mapping[str, torch.Tensor]


class Merger:
    """A merge prepared over resident state dicts; call it with new coefficients.

    ``params``/``model_params`` given here are defaults that each call may override
    (call-time values win, key by key). ``names`` label the models (DARE masks are seeded
    by name; default ``model0``, ``model1``...). ``tokenizer_source`` indexes the inputs
    with the base first: the reference for vocabulary alignment and integer buffers.
    ``vocab_sizes`` (same order) lets ``vocab="truncate"/"pad"`` recognise vocabulary rows.
    ``vocabulary`` (a :class:`~model_glue.merge.tokenizer.MergedVocabulary` of the inputs,
    base first; see :func:`~model_glue.merge.tokenizer.build_vocabulary`) permutes the
    embedding and lm_head rows to it instead, as the streaming merge does.

    Inputs are kept as given when they are bfloat16, float16 or float32 CPU tensors
    (16-bit ones stay 16-bit: half the resident size of a float32 copy), otherwise
    converted once to float32; calls never modify them. ``threads``: torch threads during
    a call (default 1 when every tensor is under 4M elements, where threads only add
    synchronisation; otherwise torch's setting; see ``threads.py``).
    """

    def __init__(
        self,
        method: str | MergeMethod,
        models: Sequence[StateDict],
        base: StateDict | None = None,
        *,
        names: Sequence[str] | None = None,
        params: Mapping[str, Any] | None = None,
        model_params: Sequence[Mapping[str, Any]] | None = None,
        dtype: str | torch.dtype | None = None,
        vocab: str = "error",
        tokenizer_source: int = 0,
        vocab_sizes: Sequence[int | None] | None = None,
        num_layers: int | None = None,
        layer_of: Callable[[str], int | None] | None = None,
        threads: int | None = None,
        vocabulary: MergedVocabulary | None = None,
    ) -> None:
        self.method = method if isinstance(method, MergeMethod) else get_method(method)
        self.method.check_inputs(len(models), base is not None)
        names = list(names) if names is not None else [f"model{i}" for i in range(len(models))]
        if len(names) != len(models) or len(set(names)) != len(names):
            raise MergeConfigError(f"names must be {len(models)} distinct labels, got {names}")
        inputs = ([base] if base is not None else []) + list(models)
        labels = (["base"] if base is not None else []) + names
        sizes = list(vocab_sizes) if vocab_sizes is not None else [None] * len(inputs)
        if vocabulary is not None:
            if len(vocabulary.input_rows) != len(inputs):
                raise MergeConfigError(
                    f"vocabulary has {len(vocabulary.input_rows)} inputs, the merge {len(inputs)}"
                )
            sizes = list(vocabulary.input_rows)
        self.vocabulary = vocabulary
        layouts = [
            InputLayout(label, tensor_shapes(sd), tensor_dtypes(sd), size)
            for label, sd, size in zip(labels, inputs, sizes, strict=True)
        ]
        out = DTYPES[dtype_name(dtype)] if dtype is not None else None
        self.plan: MergePlan = plan_merge(
            self.method,
            layouts,
            has_base=base is not None,
            reference=tokenizer_source,
            vocab_policy=vocab,
            out_dtype=out,
            num_layers=num_layers,
            layer_of=layer_of,
            vocabulary=vocabulary,
        )
        self._defaults = self._checked(
            dict(params or {}), [dict(m) for m in (model_params or [{}] * len(models))]
        )
        # lazy inputs are read per call; resident ones are prepared once and kept
        self.streaming = any(isinstance(sd, LazyTensors) for sd in inputs)
        self._sources = list(inputs)
        self._inputs: dict[str, list[torch.Tensor]] = {}
        if not self.streaming:
            for job in self.plan.jobs:
                self._inputs[job.name] = self._read(job)
        self._ctx = {job.name: TensorContext(job.name, tuple(names)) for job in self.plan.jobs}
        ref_shapes = layouts[self.plan.reference].shapes
        largest = max((math.prod(ref_shapes[j.name]) for j in self.plan.jobs), default=0)
        self.threads = threads or (1 if largest < 4 * 1024 * 1024 else torch.get_num_threads())

    def _read(self, job) -> list[torch.Tensor]:
        """One job's inputs: the reference tensor alone (copied jobs), or every input as a
        CPU tensor, 16-bit kept 16-bit, anything else float32, rows aligned."""
        ref = self._sources[self.plan.reference]
        if not job.merge:
            return [ref[job.name]]
        if job.rows is not None and self.vocabulary is not None:
            tensors = [sd[job.name].detach().to("cpu", torch.float32) for sd in self._sources]
            return [t.contiguous() for t in self.vocabulary.permute(tensors)]
        fill = ref[job.name].float() if job.rows is not None else None
        tensors = []
        for sd in self._sources:
            t = sd[job.name].detach()
            dtype = t.dtype if t.dtype in (torch.bfloat16, torch.float16) else torch.float32
            t = t.to("cpu", dtype)  # shares the caller's tensor when nothing changes
            if job.rows is not None:
                t = align_rows(t, job.rows, fill)
            tensors.append(t.contiguous())
        return tensors

    def _checked(self, params: dict, model_params: list[dict]) -> tuple[dict, list[dict]]:
        if len(model_params) != len(self.plan.model_names):
            raise MergeConfigError(
                f"model_params must have {len(self.plan.model_names)} entries, got {len(model_params)}"
            )
        for k, v in params.items():
            check_setting(self.method.param(k), v, f"params.{k}")
        for i, mp in enumerate(model_params):
            for k, v in mp.items():
                p = self.method.param(k)
                if not p.per_model:
                    raise MergeConfigError(
                        f"model_params[{i}].{k}: {k!r} is a global parameter; pass it in params"
                    )
                check_setting(p, v, f"model_params[{i}].{k}")
        return params, model_params

    def __call__(
        self,
        params: Mapping[str, Any] | None = None,
        model_params: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        with torch_threads(self.threads):
            return dict(self._merge(*self._settings(params, model_params)))

    def merge_into(
        self,
        targets: Mapping[str, torch.Tensor],
        params: Mapping[str, Any] | None = None,
        model_params: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Merge and copy each tensor into ``targets[name]`` (e.g. a model's own weights,
        on any device and in any dtype) as soon as it is merged; nothing else is kept."""
        missing = [job.name for job in self.plan.jobs if job.name not in targets]
        if missing:
            raise MergeConfigError(f"merge_into: no target tensor for {missing[:3]}")
        with torch_threads(self.threads), torch.no_grad():
            for name, merged in self._merge(*self._settings(params, model_params)):
                targets[name].copy_(merged)

    def _settings(
        self,
        params: Mapping[str, Any] | None,
        model_params: Sequence[Mapping[str, Any]] | None,
    ) -> tuple[dict, list]:
        g, ms = self._defaults
        if params:
            g = {**g, **params}
        if model_params is not None:
            if len(model_params) != len(ms):
                raise MergeConfigError(
                    f"model_params must have {len(ms)} entries, got {len(model_params)}"
                )
            ms = [{**a, **b} for a, b in zip(ms, model_params, strict=True)]
        if params or model_params is not None:
            self._checked(dict(params or {}), [dict(m) for m in (model_params or [{}] * len(ms))])
        return g, ms

    def _merge(
        self, g: Mapping[str, Any], ms: Sequence[Mapping[str, Any]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        has_base = self.plan.has_base
        for job in self.plan.jobs:
            if self.streaming and job.merge and self._chunkable(job):
                values = resolve_tensor_params(self.method, job, g, ms, self.plan.model_names)
                yield job.name, self._merge_chunks(job, values)
                continue
            tensors = self._read(job) if self.streaming else self._inputs[job.name]
            if not job.merge:
                yield job.name, (tensors[0] if self.streaming else tensors[0].clone())
                continue
            values = resolve_tensor_params(self.method, job, g, ms, self.plan.model_names)
            scratch = [t.to(torch.float32, copy=True) for t in tensors]  # exact for 16-bit
            del tensors
            base = scratch[0] if has_base else None
            models = scratch[1:] if has_base else scratch
            merged = self.method.fn(base, models, values, self._ctx[job.name])
            del scratch, base, models
            yield job.name, merged.to(job.out_dtype)

    def _chunkable(self, job) -> bool:
        return self.method.chunked and job.rows is None and math.prod(job.shape) > CHUNK

    def _merge_chunks(self, job, values: Mapping[str, Any]) -> torch.Tensor:
        """A chunked method on lazy inputs: each CHUNK of every input is read from disk,
        converted to float32 and merged, as the streaming engine does (same blocks, same
        bits), so a tensor never has more than one chunk per input resident."""
        n = math.prod(job.shape)
        method, has_base = self.method, self.plan.has_base
        out = torch.empty(n, dtype=job.out_dtype)

        def chunk(start: int, stop: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
            scratch = [_flat(sd, job.name, start, stop) for sd in self._sources]
            return (scratch[0], scratch[1:]) if has_base else (None, scratch)

        merge_chunks(method, job.name, self.plan.model_names, n, chunk, values, out)
        return out.view(job.shape)


def _flat(sd: StateDict, name: str, start: int, stop: int) -> torch.Tensor:
    """Flat elements ``start:stop`` of ``sd[name]`` as a float32 tensor the caller owns."""
    if isinstance(sd, LazyTensors):
        return sd.read_flat(name, start, stop).to(torch.float32)
    return sd[name].detach().reshape(-1)[start:stop].to("cpu", torch.float32, copy=True)


def merge_in_memory(
    spec_or_method: MergeSpec | str,
    state_dicts: Sequence[StateDict],
    base: StateDict | None = None,
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    *,
    names: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    vocab: str = "error",
    vocabulary: MergedVocabulary | None = None,
) -> dict[str, torch.Tensor]:
    """Merge resident state dicts once. For repeated merges build a :class:`Merger`.

    With a :class:`MergeSpec`, its method, parameters, model names, dtype and vocabulary
    policy apply (``state_dicts`` follow ``spec.models``; its URIs are read only for
    ``spec.tokenizer``: the inputs' tokenizers and configs, unless ``vocabulary`` is given).
    """
    if isinstance(spec_or_method, MergeSpec):
        spec = spec_or_method
        if len(state_dicts) != len(spec.models):
            raise MergeConfigError(
                f"spec lists {len(spec.models)} models but {len(state_dicts)} state dicts were given"
            )
        if (spec.base is None) != (base is None):
            raise MergeConfigError("base state dict must be given exactly when the spec has a base")
        return Merger(
            spec.method,
            state_dicts,
            base,
            names=[m.label for m in spec.models],
            params={**spec.params, **(params or {})},
            model_params=[
                {**m.params, **((model_params or [{}] * len(spec.models))[i])}
                for i, m in enumerate(spec.models)
            ],
            dtype=dtype or spec.dtype,
            vocab=spec.vocab,
            tokenizer_source=spec.tokenizer_index(),
            vocabulary=vocabulary or _spec_vocabulary(spec),
        )()
    return Merger(
        spec_or_method,
        state_dicts,
        base,
        names=names,
        params=params,
        model_params=model_params,
        dtype=dtype,
        vocab=vocab,
        vocabulary=vocabulary,
    )()


def _spec_vocabulary(spec: MergeSpec) -> MergedVocabulary | None:
    if spec.tokenizer is None:
        return None
    from model_glue.checkpoint import Checkpoint

    return spec_vocabulary(spec, [Checkpoint(uri) for _, uri in spec.inputs()])
