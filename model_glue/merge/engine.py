"""The streaming merge: safetensors in, a Hugging Face model directory out.

Tensors flow through three stages that overlap: a reader thread fetches the next
tensors of every input, the calling thread converts them to float32 and runs the method,
and a writer thread appends the result to its shard. Peak memory is a few tensors times
the number of inputs, whatever the model size. The output is built in a temporary
sibling directory and renamed when complete, so ``out_dir`` either holds a whole model or
does not exist.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from model_glue.checkpoint import Checkpoint
from model_glue.merge.card import model_card
from model_glue.merge.io import BufferPool, OutputTensor, ShardedWriter, TensorReader
from model_glue.merge.plan import (
    InputLayout,
    MergePlan,
    align_rows,
    plan_merge,
    resolve_tensor_params,
)
from model_glue.merge.registry import TensorContext
from model_glue.merge.spec import DTYPES, ENGINE_VERSION, MergeSpec, dtype_name
from model_glue.merge.threads import torch_threads

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PREFETCH = 2


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    method: str
    canonical: dict
    content_key: str | None
    num_tensors: int
    num_parameters: int
    dtype: str
    shards: tuple[str, ...]
    seconds: float


def vocab_size(config: Mapping[str, Any]) -> int | None:
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def merge_to_directory(
    spec: MergeSpec,
    out_dir: str | Path,
    *,
    shard_size: int = 2 * 1024**3,
    input_fingerprints: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    card_extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> MergeResult:
    """Merge ``spec``'s inputs into a Hugging Face directory at ``out_dir`` (local).

    ``input_fingerprints`` (by input name or URI) go into the model card and the content
    key; ``progress(done, total)`` is called after each tensor; ``card_extra`` adds
    key/values to the card. An existing ``out_dir`` is an error unless ``overwrite``.

    ``threads``: torch intra-op threads while the merge runs (restored after; see
    ``threads.py`` for why this matters). Default: one fewer than torch's current
    setting, leaving a core to the reader and writer threads.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: output directory already exists")
    checkpoints = [Checkpoint(uri) for _, uri in spec.inputs()]
    plan = _plan(spec, checkpoints)
    method = plan.method
    g = dict(spec.params)
    ms = [dict(m.params) for m in spec.models]
    values = [
        resolve_tensor_params(method, job, g, ms, plan.model_names) if job.merge else None
        for job in plan.jobs
    ]

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writer = ShardedWriter(
            tmp, [OutputTensor(j.name, j.out_dtype, j.shape) for j in plan.jobs], shard_size
        )
        with torch_threads(threads or max(1, torch.get_num_threads() - 1)):
            _stream(plan, checkpoints, values, writer, progress)
        writer.finish()
        _write_metadata(spec, plan, checkpoints, tmp, input_fingerprints, card_extra)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    key = spec.content_key(input_fingerprints) if input_fingerprints else None
    return MergeResult(
        out_dir=out_dir,
        method=method.name,
        canonical=spec.canonical(),
        content_key=key,
        num_tensors=len(plan.jobs),
        num_parameters=sum(_numel(j.shape) for j in plan.jobs),
        dtype=dtype_name(plan.out_dtype),
        shards=tuple(writer.names),
        seconds=time.perf_counter() - start,
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _plan(spec: MergeSpec, checkpoints: list[Checkpoint]) -> MergePlan:
    layouts = [
        InputLayout(
            name,
            {n: ti.shape for n, ti in ck.tensors.items()},
            {n: ti.torch_dtype for n, ti in ck.tensors.items()},
            vocab_size(ck.config),
        )
        for (name, _), ck in zip(spec.inputs(), checkpoints, strict=True)
    ]
    reference = spec.tokenizer_index()
    return plan_merge(
        spec.merge_method,
        layouts,
        has_base=spec.base is not None,
        reference=reference,
        vocab_policy=spec.vocab,
        out_dtype=DTYPES[dtype_name(spec.dtype)] if spec.dtype else None,
        num_layers=checkpoints[reference].config.get("num_hidden_layers"),
    )


def _stream(
    plan: MergePlan,
    checkpoints: list[Checkpoint],
    values: list[dict | None],
    writer: ShardedWriter,
    progress: Callable[[int, int], None] | None,
) -> None:
    pool = BufferPool()
    readers = [TensorReader(ck, pool) for ck in checkpoints]
    jobs = plan.jobs
    out_q: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while (item := out_q.get()) is not None:
            if failure:
                continue
            name, tensor, buf = item
            try:
                writer.write(name, tensor)
            except BaseException as e:  # surfaced in the calling thread
                failure.append(e)
            pool.give(buf)

    def fetch(i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        job = jobs[i]
        if not job.merge:
            return [readers[plan.reference].read(job.name)]
        return [r.read(job.name) for r in readers]

    writer_thread = threading.Thread(target=write_loop, name="merge-writer", daemon=True)
    writer_thread.start()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-reader") as io:
            pending = deque(io.submit(fetch, i) for i in range(min(PREFETCH, len(jobs))))
            for i, job in enumerate(jobs):
                raw = pending.popleft().result()
                if i + PREFETCH < len(jobs):
                    pending.append(io.submit(fetch, i + PREFETCH))
                if job.merge:
                    tensor, buf = _merge_one(plan, job, raw, values[i], pool)
                else:
                    tensor, buf = raw[0]
                if failure:
                    raise failure[0]
                out_q.put((job.name, tensor, buf))
                if progress is not None:
                    progress(i + 1, len(jobs))
    finally:
        out_q.put(None)
        writer_thread.join()
        writer.close()
        for r in readers:
            r.close()
    if failure:
        raise failure[0]


CHUNK = 1 << 17  # elements: a chunk of every input in float32 stays in the L2 cache


def _merge_one(
    plan: MergePlan, job, raw, values, pool: BufferPool
) -> tuple[torch.Tensor, torch.Tensor]:
    if plan.method.elementwise and job.rows is None and _numel(job.shape) > CHUNK:
        return _merge_chunked(plan, job, raw, values, pool)
    scratch, bufs = [], []
    fill = None
    if job.rows is not None:
        fill = raw[plan.reference][0].float()
    for tensor, buf in raw:
        if job.rows is not None:
            scratch.append(align_rows(tensor.float(), job.rows, fill))
            pool.give(buf)
        elif tensor.dtype == torch.float32:
            scratch.append(tensor)
            bufs.append(buf)
        else:
            sbuf = pool.take(tensor.numel() * 4)
            s = pool.view(sbuf, torch.float32, tensor.shape)
            s.copy_(tensor)
            pool.give(buf)
            scratch.append(s)
            bufs.append(sbuf)
    base = scratch[0] if plan.has_base else None
    models = scratch[1:] if plan.has_base else scratch
    merged = plan.method.fn(base, models, values, TensorContext(job.name, plan.model_names))
    obuf = pool.take(_numel(job.shape) * torch.empty((), dtype=job.out_dtype).element_size())
    out = pool.view(obuf, job.out_dtype, job.shape)
    out.copy_(merged)
    for b in bufs:
        pool.give(b)
    return out, obuf


def _merge_chunked(
    plan: MergePlan, job, raw, values, pool: BufferPool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise methods: convert and merge chunk by chunk, so that every pass over the
    data runs in cache instead of streaming full-size float32 copies through memory."""
    n = _numel(job.shape)
    obuf = pool.take(n * torch.empty((), dtype=job.out_dtype).element_size())
    out = pool.view(obuf, job.out_dtype, (n,))
    sbufs = [pool.take(CHUNK * 4) for _ in raw]
    flats = [tensor.view(-1) for tensor, _ in raw]
    ctx = TensorContext(job.name, plan.model_names)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        scratch = []
        for flat, sbuf in zip(flats, sbufs, strict=True):
            s = pool.view(sbuf, torch.float32, (stop - start,))
            s.copy_(flat[start:stop])
            scratch.append(s)
        base = scratch[0] if plan.has_base else None
        models = scratch[1:] if plan.has_base else scratch
        out[start:stop].copy_(plan.method.fn(base, models, values, ctx))
    for b in sbufs:
        pool.give(b)
    for _, buf in raw:
        pool.give(buf)
    return out.view(job.shape), obuf


def _write_metadata(
    spec: MergeSpec,
    plan: MergePlan,
    checkpoints: list[Checkpoint],
    tmp: Path,
    fingerprints: Mapping[str, str] | None,
    card_extra: Mapping[str, Any] | None,
) -> None:
    ref = checkpoints[plan.reference]
    config = dict(ref.config)
    out_dtype = dtype_name(plan.out_dtype)
    config["dtype"] = out_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = out_dtype
    if plan.vocab.rows is not None:
        if "vocab_size" in config:
            config["vocab_size"] = plan.vocab.rows
        elif isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "vocab_size": plan.vocab.rows}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("generation_config.json", *TOKENIZER_FILES):
        path = ref.root.rstrip("/") + "/" + name
        if ref.fs.exists(path):
            with ref.fs.open(path, "rb") as f:
                (tmp / name).write_bytes(f.read())
    (tmp / "merge_config.yaml").write_text(yaml.safe_dump(spec.to_config(), sort_keys=False))
    (tmp / "README.md").write_text(
        model_card(spec, plan, fingerprints or {}, card_extra or {}, ENGINE_VERSION)
    )
