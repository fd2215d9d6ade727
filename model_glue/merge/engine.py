"""The streaming merge: safetensors in, a Hugging Face model directory out.

Tensors flow through three stages that overlap: a reader thread fetches the next
tensors of every input, worker threads convert them to float32 and run the method (a few
tensors at once), and the calling thread appends the results, in order, to their shard.
Peak memory is a few tensors times the number of inputs, whatever the model size. The
output is built in a temporary sibling directory and renamed when complete, so
``out_dir`` either holds a whole model or does not exist.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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
from model_glue.merge.registry import CHUNK, TensorContext, merge_chunks
from model_glue.merge.spec import DTYPES, ENGINE_VERSION, MergeSpec, dtype_name
from model_glue.merge.threads import torch_threads
from model_glue.merge.tokenizer import (
    MergedVocabulary,
    copy_tokenizer_files,
    spec_vocabulary,
    vocab_size,
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
    workers: int = 1


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
    workers: int | None = None,
) -> MergeResult:
    """Merge ``spec``'s inputs into a Hugging Face directory at ``out_dir`` (local).

    ``input_fingerprints`` (by input name or URI) go into the model card and the content
    key; ``progress(done, total)`` is called after each tensor; ``card_extra`` adds
    key/values to the card. An existing ``out_dir`` is an error unless ``overwrite``.

    ``workers``: tensors merged at once. Each one in flight holds its inputs (and, for
    methods that are not chunked, float32 copies of them), so this multiplies peak
    memory; the default, :func:`choose_workers`, is 2 (1 on a single core) unless the
    largest tensors would then need more than half the memory available.
    ``threads``: torch intra-op threads while the merge runs (restored after; see
    ``threads.py`` for why this matters). Default: torch's current setting less one
    (a core for I/O), shared among the workers.
    """
    from model_glue.merge.stack import StackSpec, stack_to_directory

    if isinstance(spec, StackSpec):  # ``slices:``: layers stacked (model_glue.merge.stack)
        return stack_to_directory(
            spec,
            out_dir,
            shard_size=shard_size,
            progress=progress,
            overwrite=overwrite,
            threads=threads,
            workers=workers,
        )
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: output directory already exists")
    checkpoints = [Checkpoint(uri) for _, uri in spec.inputs()]
    plan = _plan(spec, checkpoints)
    method = plan.method
    values = tensor_values(plan, spec.params, [m.params for m in spec.models])

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writer = ShardedWriter(
            tmp, [OutputTensor(j.name, j.out_dtype, j.shape) for j in plan.jobs], shard_size
        )
        workers = workers or choose_workers(plan, checkpoints)
        threads = threads or max(1, (torch.get_num_threads() - 1) // workers)
        with torch_threads(threads):
            try:
                _stream(plan, checkpoints, values, writer, progress, workers)
            finally:
                writer.close()
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
        workers=workers,
    )


def tensor_values(
    plan: MergePlan, global_settings: Mapping[str, Any], model_settings: list[Mapping[str, Any]]
) -> list[dict | None]:
    """Each job's parameter values (None for the tensors copied, not merged)."""
    g, ms = dict(global_settings), [dict(m) for m in model_settings]
    return [
        resolve_tensor_params(plan.method, job, g, ms, plan.model_names) if job.merge else None
        for job in plan.jobs
    ]


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def job_bytes(plan: MergePlan, checkpoints: list[Checkpoint], job) -> tuple[int, int]:
    """Estimated (bytes read, bytes held while merging) of one tensor job."""
    n = _numel(job.shape)
    if not job.merge:
        read = checkpoints[plan.reference].tensors[job.name].nbytes
        return read, read
    read = sum(ck.tensors[job.name].nbytes for ck in checkpoints)
    out = n * job.out_dtype.itemsize
    if plan.method.chunked and job.rows is None and n > CHUNK:
        held = read + out + n * len(plan.model_names)  # + DARE's one-byte masks per model
    else:  # float32 copies of every input, plus a magnitude and a selection copy (top-k)
        held = read + out + 4 * n * (len(checkpoints) + 2)
    return read, held


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_workers(
    plan: MergePlan, checkpoints: list[Checkpoint], available: int | None = None
) -> int:
    """The default worker count: :func:`default_workers`, fewer when the largest tensors
    on that many workers (plus the reads in flight) would need over half of ``available``
    memory (default: what the system reports)."""
    workers = default_workers()
    available = available_memory() if available is None else available
    if available is None or not plan.jobs:
        return workers
    sizes = [job_bytes(plan, checkpoints, job) for job in plan.jobs]
    read = max(r for r, _ in sizes)
    held = max(h for _, h in sizes)
    while workers > 1 and workers * held + PREFETCH * read > available // 2:
        workers -= 1
    return workers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _plan(spec: MergeSpec, checkpoints: list[Checkpoint]) -> MergePlan:
    vocabulary = spec_vocabulary(spec, checkpoints)
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
    layout = checkpoints[reference].layout
    vocab_names = {*layout.embeddings[:1], *([layout.head] if layout.head else [])}
    return plan_merge(
        spec.merge_method,
        layouts,
        has_base=spec.base is not None,
        reference=reference,
        vocab_policy=spec.vocab,
        out_dtype=DTYPES[dtype_name(spec.dtype)] if spec.dtype else None,
        num_layers=layout.num_layers,
        layer_of=layout.layer_of,
        vocabulary=vocabulary,
        vocab_names=vocab_names if layout.embeddings else None,
    )


def _stream(
    plan: MergePlan,
    checkpoints: list[Checkpoint],
    values: list[dict | None],
    writer: ShardedWriter,
    progress: Callable[[int, int], None] | None,
    workers: int,
) -> None:
    """Read, merge and write every tensor, in plan order, with bounded memory.

    Up to ``workers + PREFETCH`` tensors are in flight: the reader thread fetches them in
    order, ``workers`` threads merge them concurrently (torch and numpy release the GIL
    in their kernels), and this thread writes the results in order.
    """
    pool = BufferPool()
    readers = [TensorReader(ck, pool) for ck in checkpoints]
    jobs = plan.jobs

    def fetch(i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        job = jobs[i]
        if not job.merge:
            return [readers[plan.reference].read(job.name)]
        return [r.read(job.name) for r in readers]

    def work(i: int, read: Future) -> tuple[torch.Tensor, torch.Tensor]:
        raw = read.result()
        if not jobs[i].merge:
            return raw[0]
        return _merge_one(plan, jobs[i], raw, values[i], pool)

    ahead = workers + PREFETCH
    try:
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-reader") as io,
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge-worker") as compute,
        ):
            pending: deque[Future] = deque()

            def submit(i: int) -> None:
                pending.append(compute.submit(work, i, io.submit(fetch, i)))

            for i in range(min(ahead, len(jobs))):
                submit(i)
            try:
                for i, job in enumerate(jobs):
                    tensor, buf = pending.popleft().result()
                    if i + ahead < len(jobs):
                        submit(i + ahead)
                    writer.write(job.name, tensor)
                    pool.give(buf)
                    if progress is not None:
                        progress(i + 1, len(jobs))
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    finally:  # the writer stays open: a stack streams several plans into it
        for r in readers:
            r.close()


def _merge_one(
    plan: MergePlan, job, raw, values, pool: BufferPool
) -> tuple[torch.Tensor, torch.Tensor]:
    if plan.method.chunked and job.rows is None and _numel(job.shape) > CHUNK:
        return _merge_chunked(plan, job, raw, values, pool)
    if job.rows is not None and plan.vocab.vocabulary is not None:
        return _merge_permuted(plan, job, raw, values, pool)
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
    obuf = pool.take(_numel(job.shape) * job.out_dtype.itemsize)
    out = pool.view(obuf, job.out_dtype, job.shape)
    out.copy_(merged)
    for b in bufs:
        pool.give(b)
    return out, obuf


def _merge_permuted(
    plan: MergePlan, job, raw, values, pool: BufferPool
) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding or lm_head: each input's rows permuted to the merged vocabulary (in
    float32), then merged as any tensor."""
    scratch = plan.vocab.vocabulary.permute([tensor.float() for tensor, _ in raw])
    for _, buf in raw:
        pool.give(buf)
    base = scratch[0] if plan.has_base else None
    models = scratch[1:] if plan.has_base else scratch
    merged = plan.method.fn(base, models, values, TensorContext(job.name, plan.model_names))
    obuf = pool.take(_numel(job.shape) * job.out_dtype.itemsize)
    out = pool.view(obuf, job.out_dtype, job.shape)
    out.copy_(merged)
    return out, obuf


def _merge_chunked(
    plan: MergePlan, job, raw, values, pool: BufferPool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked methods: convert and merge chunk by chunk, so that every pass over the
    data runs in cache instead of streaming full-size float32 copies through memory.
    A method with a ``reduce`` gets a first pass that sums it over the chunks."""
    n = _numel(job.shape)
    method = plan.method
    obuf = pool.take(n * job.out_dtype.itemsize)
    out = pool.view(obuf, job.out_dtype, (n,))
    sbufs = [pool.take(CHUNK * 4) for _ in raw]
    full = [pool.view(sbuf, torch.float32, (CHUNK,)) for sbuf in sbufs]
    flats = [tensor.view(-1) for tensor, _ in raw]

    def chunk(start: int, stop: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        scratch = []
        for flat, s in zip(flats, full, strict=True):
            s = s[: stop - start] if stop - start < CHUNK else s
            s.copy_(flat[start:stop])
            scratch.append(s)
        return (scratch[0], scratch[1:]) if plan.has_base else (None, scratch)

    merge_chunks(method, job.name, plan.model_names, n, chunk, values, out)
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
    config = output_config(ref, plan.out_dtype)
    vocabulary = plan.vocab.vocabulary
    rows = plan.vocab.rows if vocabulary is None else vocabulary.rows
    if rows is not None:
        if "vocab_size" in config:
            config["vocab_size"] = rows
        elif isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "vocab_size": rows}
    write_config_files(ref, config, spec.to_config(), tmp, tokenizer=vocabulary is None)
    if vocabulary is not None:
        _write_tokenizer(vocabulary, checkpoints, tmp)
    (tmp / "README.md").write_text(
        model_card(spec, plan, fingerprints or {}, card_extra or {}, ENGINE_VERSION)
    )


def output_config(ref: Checkpoint, out_dtype: torch.dtype) -> dict:
    """The reference input's config.json with the output's dtype."""
    config = dict(ref.config)
    config["dtype"] = dtype_name(out_dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    return config


def _write_tokenizer(
    vocabulary: MergedVocabulary, checkpoints: list[Checkpoint], tmp: Path
) -> None:
    """The merged vocabulary's tokenizer files: an input's own files when the output's
    tokenizer is that input's unchanged, else written from the built tokenizer."""
    if vocabulary.files_from is not None:
        copy_tokenizer_files(checkpoints[vocabulary.files_from], tmp)
    else:
        vocabulary.save(tmp)


def write_config_files(
    ref: Checkpoint, config: dict, merge_config: dict, tmp: Path, *, tokenizer: bool = True
) -> None:
    """``config.json``, the reference's generation and (if ``tokenizer``) tokenizer files,
    and the merge's own YAML (``merge_config.yaml``) into the output directory ``tmp``."""
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_tokenizer_files(ref, tmp, ("generation_config.json",))
    if tokenizer:
        copy_tokenizer_files(ref, tmp)
    (tmp / "merge_config.yaml").write_text(yaml.safe_dump(merge_config, sort_keys=False))
