"""Content fingerprints of checkpoints.

A fingerprint identifies *what a model is*, not where it lives: it hashes every tensor's
name, dtype, shape and bytes, the architecture signature and the tokenizer files. Moving
or re-sharding a checkpoint keeps its fingerprint; changing one weight changes it. Cache
keys of every later stage are built from fingerprints, never from paths.

Hashing a 7B checkpoint reads ~14 GB, so :func:`stat_signature` gives a cheap proxy (file
names, sizes and modification times) that callers may use to skip rehashing unchanged files.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from model_glue.architectures import config_value
from model_glue.checkpoint import TOKENIZER_FILES, Checkpoint, _join
from model_glue.sketch import SketchSettings, exact_tensors, sketch_entries, sketched_tensors

FINGERPRINT_VERSION = "2"  # "2": the architecture signature leaves the vocabulary size out
_CHUNK = 16 * 1024 * 1024

# Config keys that decide whether two checkpoints have the same tensor layout and meaning.
ARCH_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "hidden_act",
    "rope_theta",
    "num_local_experts",
    "num_experts_per_tok",
)


@dataclass(frozen=True)
class ModelFingerprint:
    fingerprint: str  # the model's identity: hash of tensors + architecture + tokenizer
    content_hash: str  # tensors only (name, dtype, shape, bytes)
    arch_signature: str  # layout: architecture config keys + tensor names and shapes
    tokenizer_hash: str  # tokenizer files ("" when the directory has none)
    architecture: str
    param_count: int
    dtype: str  # the most common tensor dtype, e.g. "BF16"
    n_tensors: int
    bytes: int
    # floating tensors holding NaN or Inf (found while hashing; no extra read)
    nonfinite: tuple[str, ...] = ()
    layout: str = ""  # the catalog's layout, or the inferred one, in one line
    layout_inferred: bool = False
    vocab: dict | None = None  # the tokenizer's token count and hash (vocab_digest)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nonfinite"] = list(self.nonfinite)
        return d


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def architecture_signature(ckpt: Checkpoint) -> str:
    """Hash of what must match for two checkpoints to be merged tensor by tensor.

    The vocabulary size is not part of it: a fine-tune that added a token (its embedding
    and head one row longer, as Llama-2 fine-tunes with a pad or ChatML token are) has its
    base's architecture, and merging aligns the vocabularies (``merge.tokenizer``). A
    tensor's row count is written ``vocab`` where it is the config's vocabulary size."""
    keys = {k: config_value(ckpt.config, k) for k in ARCH_KEYS}  # n_embd is hidden_size...
    vocab = config_value(ckpt.config, "vocab_size")
    layout = [
        (n, ["vocab", *t.shape[1:]] if t.shape and t.shape[0] == vocab else list(t.shape))
        for n, t in ckpt.tensors.items()
    ]
    return _sha(json.dumps({"config": keys, "tensors": layout}, sort_keys=True))[:32]


def tokenizer_hash(ckpt: Checkpoint) -> str:
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = _join(ckpt.root, name)
        if ckpt.fs.exists(path):
            found = True
            h.update(name.encode() + b"\0")
            with ckpt.fs.open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:32] if found else ""


def vocab_digest(ckpt: Checkpoint) -> dict | None:
    """``{"tokens": n, "hash": h}`` of the tokenizer's tokens in id order (from
    ``tokenizer.json``: the model's vocabulary and the added tokens), or None without one.
    Equal digests: one vocabulary; different ones: :func:`flows.steps.fingerprint` checks
    that one extends the other before clustering the models together."""
    path = _join(ckpt.root, "tokenizer.json")
    if not ckpt.fs.exists(path):
        return None
    try:
        with ckpt.fs.open(path, "rb") as f:
            data = json.load(f)
        vocab = data["model"]["vocab"]
        ids = (
            {tok: i for i, (tok, *_) in enumerate(vocab)}
            if isinstance(vocab, list)
            else dict(vocab)
        )
        ids |= {t["content"]: t["id"] for t in data.get("added_tokens") or ()}
    except (ValueError, KeyError, TypeError):
        return None  # a tokenizer.json of another shape: compared when tokenizers differ
    by_id = sorted((i, tok) for tok, i in ids.items())
    return {"tokens": len(by_id), "hash": _sha(json.dumps(by_id))[:16]}


_FLOATS = {"F64", "F32", "F16", "BF16"}


def _tensor_digest(
    ckpt: Checkpoint,
    name: str,
    finite: list[bool] | None = None,
    keep: bytearray | None = None,
) -> str:
    """sha256 of a tensor's bytes; with ``finite``, also appends whether every value of a
    floating tensor is finite (the chunk is already in memory: one ``isfinite`` pass);
    with ``keep`` (``nbytes`` long), also copies the bytes there (for its sketch)."""
    info = ckpt.tensors[name]
    h = hashlib.sha256()
    check = finite is not None and info.dtype in _FLOATS and info.nbytes > 0
    dtype, ok = info.torch_dtype, True
    with ckpt.fs.open(_join(ckpt.root, info.file), "rb") as f:
        f.seek(info.begin)
        remaining = info.nbytes
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise ValueError(f"{ckpt.uri}/{info.file}: truncated while hashing {name!r}")
            h.update(chunk)
            if keep is not None:
                done = info.nbytes - remaining
                keep[done : done + len(chunk)] = chunk
            if check and ok:
                with warnings.catch_warnings():  # a read-only buffer: only read here
                    warnings.simplefilter("ignore", UserWarning)
                    values = torch.frombuffer(chunk, dtype=dtype)
                ok = bool(torch.isfinite(values).all())
            remaining -= len(chunk)
    if finite is not None:
        finite.append(ok)
    return h.hexdigest()


def fingerprint_checkpoint(
    uri: str | Checkpoint, *, progress: Callable[[int, int], None] | None = None
) -> ModelFingerprint:
    """Hash a checkpoint's content. Reads every tensor once, in bounded chunks."""
    return fingerprint_and_sketch(uri, None, progress=progress)[0]


def fingerprint_and_sketch(
    uri: str | Checkpoint,
    sketch: SketchSettings | None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ModelFingerprint, dict[str, torch.Tensor]]:
    """The fingerprint and, with ``sketch`` settings, the sketch of every matrix
    similarity may compare (:mod:`model_glue.sketch`), made from the bytes the hash reads:
    no extra read of the checkpoint. The matrices the error budget needs are kept exactly
    (:func:`~model_glue.sketch.exact_tensors`: the same for every checkpoint of one
    layout). Memory: one tensor at a time."""
    ckpt = uri if isinstance(uri, Checkpoint) else Checkpoint(str(uri))
    layout = ckpt.layout  # tensors that contradict the declared architecture fail here
    outer = hashlib.sha256(f"model-glue-fingerprint-v{FINGERPRINT_VERSION}\n".encode())
    total = len(ckpt.tensors)
    nonfinite = []
    targets = set(sketched_tensors(layout)) if sketch is not None else set()
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    exact = exact_tensors(layout, shapes, sketch) if sketch is not None else frozenset()
    sketches: dict[str, torch.Tensor] = {}
    for i, (name, info) in enumerate(ckpt.tensors.items()):  # sorted by name: shard-independent
        finite: list[bool] = []
        keep = bytearray(info.nbytes) if name in targets and info.nbytes else None
        digest = _tensor_digest(ckpt, name, finite, keep)
        if keep is not None:
            with warnings.catch_warnings():  # the buffer is ours and not written again
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.frombuffer(keep, dtype=info.torch_dtype).reshape(info.shape)
            sketches.update(sketch_entries(layout, name, tensor, sketch, exact))
            del tensor, keep
        outer.update(f"{name}|{info.dtype}|{list(info.shape)}|{digest}\n".encode())
        if not finite[0]:
            nonfinite.append(name)
        if progress:
            progress(i + 1, total)
    content = outer.hexdigest()
    arch = architecture_signature(ckpt)
    tok = tokenizer_hash(ckpt)
    fp = ModelFingerprint(
        fingerprint=_sha(f"{content}|{arch}|{tok}")[:32],
        content_hash=content,
        arch_signature=arch,
        tokenizer_hash=tok,
        architecture=(
            ckpt.config.get("architectures") or [ckpt.config.get("model_type", "unknown")]
        )[0],
        param_count=ckpt.num_parameters,
        dtype=ckpt.main_dtype,
        n_tensors=len(ckpt.tensors),
        bytes=sum(t.nbytes for t in ckpt.tensors.values()),
        nonfinite=tuple(nonfinite),
        layout=layout.describe(),
        layout_inferred=layout.inferred,
        vocab=vocab_digest(ckpt),
    )
    return fp, sketches


def stat_signature(uri: str) -> str:
    """A cheap proxy for content: names, sizes and mtimes of every file in the directory.

    Equal signatures mean the files were not touched, so a stored fingerprint can be reused;
    a different signature only means "rehash", never "different content".
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{uri}: model directory does not exist")
    rows = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
        rows.append((path[len(root.rstrip("/")) + 1 :], info.get("size"), str(mtime)))
    return _sha(json.dumps(rows))[:32]
