"""Tensor I/O for the streaming merge: pooled reads and a streaming sharded writer.

Reads go through ``os.preadv`` into reused buffers instead of memory maps, so the
process holds only the tensors in flight (mapped input pages would count in its resident
memory for the whole merge). The writer knows every output tensor's shape and dtype
before the first one is computed, so it writes each shard's header first and then
appends tensors as they come: no shard is ever assembled in memory.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model_glue.checkpoint import TORCH_TO_SAFETENSORS, Checkpoint, CheckpointError

INDEX_NAME = "model.safetensors.index.json"


class BufferPool:
    """Reusable byte buffers: a fresh large allocation costs a page fault per 4 KiB."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self._free[i].numel())
                return self._free.pop(best)
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)

    def view(self, buffer: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        size = numel * dtype.itemsize
        return buffer[:size].view(dtype).view(tuple(shape))


class TensorReader:
    """Reads raw tensors of one checkpoint into pooled buffers (local files by preadv)."""

    def __init__(self, checkpoint: Checkpoint, pool: BufferPool) -> None:
        self.ck = checkpoint
        self.pool = pool
        self._fds: dict[str, int] = {}

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(tensor in its stored dtype, the buffer to give back to the pool)."""
        info = self.ck.tensors[name]
        buf = self.pool.take(info.nbytes)
        target = buf[: info.nbytes]
        if self.ck.is_local:
            self._pread(info.file, info.begin, target)
        else:
            data = self.ck.read_bytes(name)
            if info.nbytes:
                target.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return self.pool.view(buf, info.torch_dtype, info.shape), buf

    def _pread(self, file: str, offset: int, target: torch.Tensor) -> None:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(os.path.join(self.ck.root, file), os.O_RDONLY)
        view = memoryview(target.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{self.ck.uri}/{file}: truncated while reading at byte {offset + done}"
                )
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: Sequence[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Group tensors, in order, into shards of at most ``shard_size`` bytes (a bigger
    tensor gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(tensors: Sequence[OutputTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Writes safetensors shards in one forward pass, tensor by tensor, in plan order."""

    def __init__(self, out_dir: Path, tensors: Sequence[OutputTensor], shard_size: int) -> None:
        self.out_dir = out_dir
        self.shards = plan_shards(tensors, shard_size)
        self.names = shard_names(len(self.shards))
        self._order = [(s, t) for s, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._file = None
        self._shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected = self._order[self._next]
        if (
            name != expected.name
            or tensor.dtype != expected.dtype
            or tuple(tensor.shape) != expected.shape
        ):
            raise RuntimeError(
                f"writer expected {expected}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if shard != self._shard:
            self._open(shard)
        if tensor.numel():
            data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
            self._file.write(memoryview(data))
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard:
            self._file.close()
            self._file = None

    def _open(self, shard: int) -> None:
        self._shard = shard
        self._file = open(self.out_dir / self.names[shard], "wb")  # noqa: SIM115 (closed in write/close)
        self._file.write(_header(self.shards[shard]))

    def finish(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        if len(self.shards) > 1:
            weight_map = {
                t.name: self.names[s] for s, shard in enumerate(self.shards) for t in shard
            }
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
