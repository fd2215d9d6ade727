"""Loading expert checkpoints and writing mixture directories safely.

Mixtures read whole models (not single tensors), so they go through transformers; this module
adds the checks the builders need (a clear error naming the model) and the write-then-rename
discipline every output directory follows.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from model_glue.devices import resolve_device, resolve_dtype
from model_glue.mixture.errors import MixtureError

ModelSource = str | Path | PreTrainedModel


def local_dir(uri: str | Path, what: str) -> Path:
    """The local directory behind ``uri``; mixtures load whole models, so remote URLs are refused."""
    text = str(uri)
    if "://" in text and not text.startswith("file://"):
        raise MixtureError(
            f"{what} {text}: only local model directories are supported for mixtures"
        )
    path = Path(text.removeprefix("file://"))
    if not path.is_dir():
        raise MixtureError(f"{what} {text}: model directory does not exist")
    if not (path / "config.json").exists():
        raise MixtureError(f"{what} {text}: no config.json (not a Hugging Face model directory)")
    return path


def load_model(
    source: ModelSource,
    what: str = "model",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "float32",
) -> PreTrainedModel:
    """A causal LM in eval mode, from a directory (safetensors only, no remote code) or an
    already loaded model (returned as it is). A directory is loaded on ``device`` in
    ``dtype``; ``None`` or ``auto`` is the evaluation default of :mod:`model_glue.devices`
    (the checkpoint's own dtype on a GPU, float32 on a CPU)."""
    if isinstance(source, PreTrainedModel):
        return source.eval()
    path = local_dir(source, what)
    device = resolve_device(device)
    torch_dtype = placed_dtype(path, device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as e:
        raise MixtureError(f"{what} {path}: cannot be loaded as a causal LM ({e})") from e
    return model.to(device).eval()


def placed_dtype(path: Path, device: str, dtype: str | torch.dtype | None) -> torch.dtype:
    """``dtype`` resolved for the model directory ``path`` on ``device``; the checkpoint's
    headers are read only when its own dtype is the answer (``auto`` on a GPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    stored = None
    if dtype in (None, "auto") and device != "cpu":
        from model_glue.checkpoint import Checkpoint

        stored = Checkpoint(str(path)).main_dtype
    return resolve_dtype(dtype, device, stored)


def load_tokenizer(source: str | Path, what: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model; every expert of a mixture must ship its own."""
    path = local_dir(source, what)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise MixtureError(
            f"{what} {path}: no loadable tokenizer in the model directory ({e})"
        ) from e


def model_name(source: ModelSource, index: int) -> str:
    if isinstance(source, PreTrainedModel):
        return f"expert{index}"
    return Path(str(source).removeprefix("file://")).name


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; rename it to ``out_dir`` only if the block succeeds.

    A crash never leaves a half-written mixture under the final name; an existing ``out_dir``
    is replaced only after the new one is complete.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def describe_source(source: ModelSource) -> str:
    """How a mixture's provenance record names an input model."""
    return (
        "<in-memory model>"
        if isinstance(source, PreTrainedModel)
        else str(Path(str(source)).absolute())
    )


def try_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase | None:
    """The tokenizer beside ``source``, or None for in-memory models and tokenizer-less dirs."""
    if isinstance(source, PreTrainedModel):
        return None
    try:
        return load_tokenizer(source, "model")
    except MixtureError:
        return None


def first_tokenizer(sources: list[ModelSource]) -> PreTrainedTokenizerBase | None:
    for s in sources:
        tok = try_tokenizer(s)
        if tok is not None:
            return tok
    return None
