"""Where and in which precision models are evaluated: ``evaluation.device`` and ``dtype``.

``auto`` picks CUDA when torch sees a GPU, else the CPU. The default dtype is the
checkpoint's own on a GPU (bf16 checkpoints evaluate in bf16, as they were trained) and
float32 on a CPU, where bf16 matrix products are slow and change the numbers. The device
index never changes a score, so cache keys hold the resolved dtype, not the device.
"""

from __future__ import annotations

import re

import torch

from model_glue.errors import InputError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # fingerprint codes


class DeviceError(InputError):
    """A device that this machine does not have."""


def resolve_device(setting: str | None = "auto", *, cuda_available: bool | None = None) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; an explicit CUDA device must exist."""
    setting = setting or "auto"
    if not re.match(DEVICE_PATTERN, setting):
        raise DeviceError(f"device {setting!r}: expected auto, cpu, cuda or cuda:N")
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if setting == "auto":
        return "cuda" if has_cuda else "cpu"
    if setting.startswith("cuda"):
        if not has_cuda:
            raise DeviceError(f"device {setting!r}: torch sees no CUDA device on this machine")
        index = int(setting.partition(":")[2] or 0)
        count = torch.cuda.device_count() if cuda_available is None else index + 1
        if index >= count:
            raise DeviceError(f"device {setting!r}: this machine has {count} CUDA device(s)")
    return setting


def resolve_dtype(
    setting: str | None, device: str, stored: torch.dtype | str | None = None
) -> torch.dtype:
    """The evaluation dtype: ``setting`` if given (not ``auto``), else the checkpoint's
    ``stored`` floating dtype on a GPU and float32 on a CPU."""
    if setting not in (None, "auto"):
        if setting not in DTYPES:
            raise DeviceError(f"dtype {setting!r}: expected auto or one of {', '.join(DTYPES)}")
        return DTYPES[setting]
    if device == "cpu":
        return torch.float32
    if isinstance(stored, str):
        name = stored.removeprefix("torch.")
        stored = DTYPES.get(_SAFETENSORS.get(name, name))
    return stored if stored in DTYPES.values() else torch.float32


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
