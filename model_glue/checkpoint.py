"""Lazy, streaming access to Hugging Face checkpoints stored as safetensors.

A checkpoint is a directory (local path or any fsspec URL) holding ``config.json`` and
either ``model.safetensors`` or a sharded ``model.safetensors.index.json``. Only the
headers are read when a checkpoint is opened; tensors are read one at a time, so callers
(fingerprinting, similarity, merging) keep memory bounded by a few tensors.

Pickled weights (``pytorch_model.bin``) are refused unless the caller opts in, because
unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import fsspec
import torch

from model_glue.architectures import Layout, resolve_layout
from model_glue.errors import InputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024


# The files of a Hugging Face directory that make its tokenizer: what fingerprints hash, what
# a merge or an applied adapter copies, what a hub snapshot downloads.
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


class CheckpointError(InputError):
    """A checkpoint is missing, truncated or not a safetensors Hugging Face directory."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # file name inside the checkpoint directory
    begin: int  # absolute byte offset of the data in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read_safetensors_header(
    fs: fsspec.AbstractFileSystem, path: str, file_name: str
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors header and check everything the format requires.

    The header is a JSON object of tensors (and an optional ``__metadata__`` map of strings
    to strings); each tensor has a known dtype, a shape of non-negative integers and
    ``data_offsets`` [begin, end] whose span is exactly ``numel x itemsize`` bytes; sorted by
    offset, the tensors tile the data section from its first byte to the end of the file,
    without gaps or overlaps. Every violation is a :class:`CheckpointError` naming the file,
    the tensor and the reason."""
    try:
        size = fs.size(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with fs.open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file "
                f"(header claims {header_len} bytes, file has {size})"
            )
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, _DuplicateKey) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, h in header.items():
        dtype, shape, b, e = _tensor_entry(path, name, h)
        itemsize = SAFETENSORS_DTYPES[dtype].itemsize
        numel = math.prod(shape)
        if e - b != numel * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r}: shape {list(shape)} of {dtype} needs "
                f"{numel * itemsize} bytes, its offsets span {e - b}"
            )
        if e > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (tensors need {data_start + e} bytes, "
                f"file has {size}; tensor {name!r})"
            )
        infos[name] = TensorInfo(name, dtype, shape, file_name, data_start + b, data_start + e)
        spans.append((b, e, name))
    spans.sort()
    at, prev = 0, None
    for b, e, name in spans:
        if b != at:
            what = "overlaps" if b < at else "leaves a gap after"
            raise CheckpointError(
                f"{path}: tensor {name!r} (bytes {b}..{e}) {what} "
                + (f"tensor {prev!r}" if prev else "the start of the data")
            )
        at, prev = e, name
    if at != data_size:
        raise CheckpointError(
            f"{path}: {data_size - at} bytes after the last tensor are not part of any tensor"
        )
    return infos, metadata


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key {k!r} appears twice")
        out[k] = v
    return out


def _tensor_entry(path: str, name: str, h: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked for its type."""

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {reason}")

    if not isinstance(h, dict) or set(h) != {"dtype", "shape", "data_offsets"}:
        raise bad("header entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass
class Checkpoint:
    """A Hugging Face model directory, opened lazily.

    ``uri`` may be a local path or an fsspec URL (``s3://bucket/model``, ``memory://x``).
    """

    uri: str
    allow_pickle: bool = False
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        if not self.fs.isdir(self.root):
            raise CheckpointError(f"{self.uri}: model directory does not exist")
        if not self.fs.exists(_join(self.root, "config.json")):
            raise CheckpointError(
                f"{self.uri}: no config.json (not a Hugging Face model directory)"
            )
        _ = self.tensors  # parse headers eagerly so that bad files fail at open time

    @property
    def is_local(self) -> bool:
        return "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    @cached_property
    def config(self) -> dict:
        with self.fs.open(_join(self.root, "config.json"), "r") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{self.uri}/config.json: invalid JSON ({e})") from e

    @cached_property
    def weight_files(self) -> list[str]:
        """Names of the safetensors files, in index order."""
        if self.fs.exists(_join(self.root, INDEX_FILE)):
            with self.fs.open(_join(self.root, INDEX_FILE), "r") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{self.uri}/{INDEX_FILE}: malformed index ({e})") from e
            return sorted(set(weight_map.values()))
        if self.fs.exists(_join(self.root, SINGLE_FILE)):
            return [SINGLE_FILE]
        if any(self.fs.exists(_join(self.root, p)) for p in PICKLE_FILES):
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{self.uri}: only pickled weights (pytorch_model.bin) found; refusing to "
                    "unpickle untrusted files. Convert to safetensors or opt in with allow_pickle."
                )
            raise CheckpointError(
                f"{self.uri}: pickled checkpoints are not supported by the streaming reader"
            )
        raise CheckpointError(f"{self.uri}: no model.safetensors or {INDEX_FILE} found")

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for fname in self.weight_files:
            part, _ = read_safetensors_header(self.fs, _join(self.root, fname), fname)
            dup = infos.keys() & part.keys()
            if dup:
                raise CheckpointError(
                    f"{self.uri}: tensor {sorted(dup)[0]!r} appears in two shards"
                )
            infos.update(part)
        if not infos:
            raise CheckpointError(f"{self.uri}: checkpoint holds no tensors")
        return dict(sorted(infos.items()))

    def names(self) -> list[str]:
        return list(self.tensors)

    @cached_property
    def layout(self) -> Layout:
        """What each tensor is (the architecture catalog's entry, or an inferred layout);
        a :class:`~model_glue.architectures.LayoutError` when the tensors contradict it."""
        shapes = {n: t.shape for n, t in self.tensors.items()}
        return resolve_layout(self.config, shapes, where=self.uri)

    def read_bytes(self, name: str) -> bytes:
        info = self._info(name)
        with self.fs.open(_join(self.root, info.file), "rb") as f:
            f.seek(info.begin)
            data = f.read(info.nbytes)
        if len(data) != info.nbytes:
            raise CheckpointError(f"{self.uri}/{info.file}: truncated while reading {name!r}")
        return data

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in its stored dtype).

        Local files are read with ``readinto`` straight into the new tensor's memory, not
        memory-mapped: mapped pages would stay in this process's resident set after the
        tensor is dropped, so reading a whole cluster tensor by tensor would look (and, under
        memory pressure, act) as if every model were resident."""
        info = self._info(name)
        if self.is_local:
            out = torch.empty(info.shape, dtype=info.torch_dtype)
            if info.nbytes == 0:
                return out
            self._read_into(info, info.begin, out.view(-1).view(torch.uint8))
            return out
        data = self.read_bytes(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(bytearray(data), dtype=info.torch_dtype).reshape(info.shape)

    def _read_into(self, info: TensorInfo, offset: int, buf: torch.Tensor) -> None:
        """Fill the uint8 tensor ``buf`` from the local file of ``info`` at byte ``offset``."""
        view = memoryview(buf.numpy())
        got = 0
        with open(os.path.join(self.root, info.file), "rb", buffering=0) as f:
            f.seek(offset)
            while got < len(view):  # one read returns at most ~2 GiB on Linux
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != len(view):
            raise CheckpointError(f"{self.uri}/{info.file}: truncated while reading {info.name!r}")

    @property
    def main_dtype(self) -> str:
        """The safetensors dtype code holding the most elements (e.g. ``"BF16"``)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return max(counts, key=counts.__getitem__)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for n in names if names is not None else self.names():
            yield n, self.tensor(n)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.uri}: no tensor named {name!r}") from None

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def files(self) -> list[str]:
        """Every file of the directory (names relative to the root), sorted."""
        out = []
        for p in self.fs.find(self.root):
            rel = p[len(self.root.rstrip("/")) + 1 :]
            out.append(rel)
        return sorted(out)


class LazyTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors as a read-only mapping that reads each tensor when asked.

    Nothing is resident: every lookup reads a fresh CPU tensor in its stored dtype (from the
    page cache after the first read), which the caller drops when done. Shapes and dtypes
    come from the safetensors headers, so planning a merge over many large checkpoints
    reads no weights. This is how the search keeps one model resident however large the
    cluster is.
    """

    def __init__(self, checkpoint: Checkpoint | str) -> None:
        self.checkpoint = (
            checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        )
        infos = self.checkpoint.tensors
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(i.shape) for n, i in infos.items()}
        self.dtypes: dict[str, torch.dtype] = {n: i.torch_dtype for n, i in infos.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self.checkpoint.tensor(name)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor, read from disk alone (local
        files; other filesystems read the tensor and slice it)."""
        info = self.checkpoint._info(name)
        if not self.checkpoint.is_local:
            return self.checkpoint.tensor(name).view(-1)[start:stop].clone()
        dtype = info.torch_dtype
        out = torch.empty(stop - start, dtype=dtype)
        if stop > start:
            offset = info.begin + start * dtype.itemsize
            self.checkpoint._read_into(info, offset, out.view(torch.uint8))
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"LazyTensors({self.checkpoint.uri!r}, {len(self)} tensors)"


def tensor_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of a state dict's tensors; for :class:`LazyTensors`, from the headers."""
    if isinstance(sd, LazyTensors):
        return dict(sd.shapes)
    return {k: tuple(v.shape) for k, v in sd.items()}


def tensor_dtypes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """Dtypes of a state dict's tensors; for :class:`LazyTensors`, from the headers."""
    if isinstance(sd, LazyTensors):
        return dict(sd.dtypes)
    return {k: v.dtype for k, v in sd.items()}
