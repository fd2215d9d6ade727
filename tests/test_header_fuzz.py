"""Every malformed safetensors header is refused with a CheckpointError; whatever is
accepted reads back the tensors that the ``safetensors`` library reads (property-based)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_glue.checkpoint import Checkpoint, CheckpointError, read_safetensors_header

TENSORS = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1.5, -2.0, 0.25, 8.0], dtype=torch.bfloat16),
    "c": torch.tensor([7], dtype=torch.int64),
    "d": torch.zeros(0, dtype=torch.float16),
    "e": torch.tensor([True, False, True]),
}
DTYPES = {"a": "F32", "b": "BF16", "c": "I64", "d": "F16", "e": "BOOL"}


def _valid() -> tuple[dict, bytes]:
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, t in TENSORS.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": DTYPES[name],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return header, data


def _file(header: object, data: bytes, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    n = len(text) if header_len is None else header_len
    return struct.pack("<Q", n) + text + data


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)
NAMES = st.sampled_from(list(TENSORS))


@st.composite
def mutated(draw) -> bytes:
    header, data = _valid()
    header_len = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                [
                    "dtype",
                    "shape",
                    "offsets",
                    "offset",
                    "length",
                    "truncate",
                    "append",
                    "metadata",
                    "extra_key",
                    "drop_key",
                    "entry",
                    "drop_tensor",
                ]
            )
        )
        name = draw(NAMES)
        entry = header.get(name)
        if kind == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(
                st.sampled_from(
                    ["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X9", "f32"]
                )
                | JSON_VALUES
            )
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(st.integers(-2, 8), max_size=3) | JSON_VALUES)
        elif kind == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(
                st.lists(st.integers(-4, 80), min_size=0, max_size=3) | JSON_VALUES
            )
        elif (
            kind == "offset"
            and isinstance(entry, dict)
            and isinstance(entry.get("data_offsets"), list)
            and entry["data_offsets"]
        ):
            i = draw(st.integers(0, len(entry["data_offsets"]) - 1))
            entry["data_offsets"][i] = draw(st.integers(-4, 80))
        elif kind == "length":
            header_len = draw(st.integers(0, 2**64 - 1) | st.integers(0, 600))
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=8))
        elif kind == "metadata":
            header["__metadata__"] = draw(JSON_VALUES)
        elif kind == "extra_key" and isinstance(entry, dict):
            entry[draw(st.text(max_size=4))] = draw(JSON_VALUES)
        elif kind == "drop_key" and isinstance(entry, dict) and entry:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif kind == "entry":
            header[name] = draw(JSON_VALUES)
        elif kind == "drop_tensor":
            header.pop(name, None)
    return _file(header, data, header_len)


def _ours(path: Path) -> dict[str, torch.Tensor] | None:
    fs = fsspec.filesystem("file")
    try:
        infos, _ = read_safetensors_header(fs, str(path), path.name)
    except CheckpointError:
        return None
    out = {}
    for name, info in infos.items():
        with open(path, "rb") as f:
            f.seek(info.begin)
            raw = bytearray(f.read(info.nbytes))
        out[name] = (
            torch.frombuffer(raw, dtype=info.torch_dtype).reshape(info.shape)
            if raw
            else torch.empty(info.shape, dtype=info.torch_dtype)
        )
    return out


def _theirs(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception:
        return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_bytes = lambda t: t.contiguous().view(-1).view(torch.uint8) if t.numel() else t  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def test_the_valid_file_reads_like_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_file(*_valid()))
    ours, theirs = _ours(path), _theirs(path)
    assert ours is not None and theirs is not None and ours.keys() == theirs.keys()
    assert all(_same(ours[k], theirs[k]) for k in ours)


def _set(name: str, **fields):
    def mutate(header: dict, data: bytes) -> bytes:
        header[name].update(fields)
        return data

    return mutate


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            _set("a", shape=[3, 3]),
            r"tensor 'a': shape \[3, 3\] of F32 needs 36 bytes, its offsets span 24",
        ),
        (_set("b", dtype="F32"), "tensor 'b': .* needs 16 bytes, its offsets span 8"),
        (_set("c", data_offsets=[24, 32]), r"tensor 'c' \(bytes 24..32\) overlaps tensor 'b'"),
        (_set("a", shape=[2, -3]), "tensor 'a': shape .* not a list of non-negative"),
        (_set("a", shape=[2, True]), "tensor 'a': shape .* not a list of non-negative"),
        (_set("c", dtype="C64"), "tensor 'c': unsupported dtype 'C64'"),
        (_set("c", data_offsets=[40, 32]), "tensor 'c': data_offsets .* 0 <= begin <= end"),
        (lambda h, d: h.update(__metadata__={"format": 1}) or d, "__metadata__ must map strings"),
        (lambda h, d: d + b"\0", "1 bytes after the last tensor"),
        (lambda h, d: d[:-2], "truncated safetensors file .*tensor 'e'"),
    ],
)
def test_named_violations(tmp_path, mutate, reason):
    header, data = _valid()
    data = mutate(header, data)
    path = tmp_path / "model.safetensors"
    path.write_bytes(_file(header, data))
    with pytest.raises(CheckpointError, match=reason) as info:
        read_safetensors_header(fsspec.filesystem("file"), str(path), path.name)
    assert str(path) in str(info.value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=mutated())
def test_mutated_headers_are_refused_or_read_like_safetensors(blob):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        ours = _ours(path)  # anything but a CheckpointError propagates and fails the test
        if ours is None:
            return
        theirs = _theirs(path)
        assert theirs is not None, "accepted a header that safetensors refuses"
        assert ours.keys() == theirs.keys()
        assert all(_same(ours[k], theirs[k]) for k in ours)


def test_checkpoint_open_refuses_a_bad_header(tmp_path, tiny_llama):
    d = tiny_llama("m")
    f = d / "model.safetensors"
    blob = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [*header[name]["shape"], 2]
    f.write_bytes(_file(header, bytes(blob[8 + n :])))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}'"):
        Checkpoint(str(d))
