"""Apply a PEFT LoRA adapter to its base checkpoint, exactly and streaming.

Many hub fine-tunes are published as a PEFT adapter directory (``adapter_config.json`` and
``adapter_model.safetensors``) instead of a full model. :func:`apply_adapter` turns one into
a full Hugging Face checkpoint: it reads the base one tensor at a time, adds the adapter's
``scale * (B @ A)`` to the tensors it targets and writes sharded safetensors with the merge
engine's writer. The arithmetic is PEFT's own (``merge_and_unload``), operation for
operation, so the output equals PEFT's merged state dict bit for bit (the tests check
float32 and bfloat16 bases):

- linear targets: ``W += transpose(B.float() @ A.float()) * scale`` (the sum in float32,
  rounded once to the base dtype); ``transpose`` for GPT-2's ``Conv1D`` (``[in, out]``)
  weights, which PEFT decides by the module type whatever ``fan_in_fan_out`` says;
- embedding targets: ``W += ((B @ A).T * scale).to(W.dtype)`` (PEFT rounds the delta first);
- ``lora_bias``: ``bias += lora_B.bias * scale``;
- ``scale`` = ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and
  ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` as PEFT matches them;
- tensors the adapter stores whole (``modules_to_save``, biases trained with
  ``bias="all"``/``"lora_only"``, saved embedding layers, possibly resized for added tokens)
  replace the base's, before any delta is added, as PEFT loads them.

What PEFT does not merge this way is refused in one line naming the adapter and the reason
(:class:`AdapterError`): other PEFT types, DoRA and the other LoRA variants, initialisations
that rewrite the base weights when the adapter is loaded (PiSSA, OLoRA, LoftQ...), quantized
bases, pickled weights unless ``allow_pickle``, adapter tensors without a base tensor, and
shape mismatches.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch
import yaml

from model_glue.architectures import Layout
from model_glue.architectures.layout import LayoutError
from model_glue.checkpoint import (
    SAFETENSORS_DTYPES,
    TOKENIZER_FILES,
    Checkpoint,
    read_safetensors_header,
)
from model_glue.errors import InputError
from model_glue.merge.engine import output_config
from model_glue.merge.io import OutputTensor, ShardedWriter
from model_glue.merge.tokenizer import vocab_size

ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# LoraConfig fields that select a variant PEFT merges otherwise than W + scale * B @ A
VARIANT_FIELDS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
)
# ... and fields whose adapters are not a set of per-module deltas and replacements
UNSUPPORTED_FIELDS = ("layer_replication", "target_parameters", "trainable_token_indices")
# initialisations that leave the base weights alone when PEFT loads the adapter (PiSSA,
# CorDA, OLoRA, MiCA, LoftQ and LoRA-GA rewrite them, so the merge depends on that rewrite)
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# an adapter directory with one of these ships a tokenizer of its own
TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
# what the fingerprint leaves out: where the adapter came from, not what it does
NON_SEMANTIC_FIELDS = ("base_model_name_or_path", "revision", "peft_version", "inference_mode")
# copies PEFT saves beside a modules_to_save tensor and ignores when loading it (the
# wrapper's original and a second copy of the saved one)
_IGNORED = re.compile(r"\.(original_module|modules_to_save)\.")
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias"
    r"|lora_embedding_A|lora_embedding_B)$"
)


class AdapterError(InputError):
    """An adapter that cannot be applied exactly (the message names it and why)."""


@dataclass(frozen=True)
class AdapterInfo:
    """What ``adapter_config.json`` says, checked to be a LoRA that can be merged exactly."""

    uri: str
    peft_type: str
    base_model_name_or_path: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: tuple[str, ...] | str | None
    modules_to_save: tuple[str, ...]
    layers_to_transform: tuple[int, ...] | int | None
    rank_pattern: dict[str, int] = field(hash=False)
    alpha_pattern: dict[str, float] = field(hash=False)
    use_dora: bool
    bias: str
    lora_bias: bool
    weight_files: tuple[str, ...]
    config: dict = field(repr=False, compare=False)

    def rank(self, module: str) -> int:
        """The rank of ``module`` (its name in the model): ``rank_pattern`` or ``r``."""
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)

    def alpha(self, module: str) -> float:
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)

    def scaling(self, module: str) -> float:
        """PEFT's ``scaling[adapter]`` of ``module``, the same expression in the same order."""
        r, alpha = self.rank(module), self.alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _open_dir(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


def is_adapter(uri: str) -> bool:
    """Whether ``uri`` (a local path or fsspec URL) is a PEFT adapter directory: it holds
    ``adapter_config.json`` and either no ``config.json`` or adapter weights (adapters that
    ship their base's config.json still hold ``adapter_model.*``)."""
    try:
        fs, root = _open_dir(uri)
        if not fs.exists(_join(root, ADAPTER_CONFIG)):
            return False
        if not fs.exists(_join(root, "config.json")):
            return True
        return any(fs.exists(_join(root, w)) for w in (SAFE_WEIGHTS, PICKLE_WEIGHTS))
    except (OSError, ValueError):
        return False


def read_adapter(uri: str, *, allow_pickle: bool = False) -> AdapterInfo:
    """Read and check ``adapter_config.json``; an :class:`AdapterError` for anything that
    :func:`apply_adapter` could not apply exactly (checked again there against the base)."""
    fs, root = _open_dir(uri)

    def refuse(reason: str) -> AdapterError:
        return AdapterError(f"{uri}: {reason}")

    config = _read_config(fs, root, refuse)
    _check_config(config, refuse)
    weights = _weight_files(fs, root, allow_pickle, refuse)
    return AdapterInfo(
        uri=uri,
        peft_type=config["peft_type"],
        base_model_name_or_path=config.get("base_model_name_or_path"),
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        target_modules=_tuple_or_value(config.get("target_modules")),
        modules_to_save=tuple(config.get("modules_to_save") or ()),
        layers_to_transform=_tuple_or_value(config.get("layers_to_transform")),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        use_dora=bool(config.get("use_dora")),
        bias=config.get("bias") or "none",
        lora_bias=bool(config.get("lora_bias")),
        weight_files=weights,
        config=config,
    )


def _read_config(
    fs: fsspec.AbstractFileSystem, root: str, refuse: Callable[[str], AdapterError]
) -> dict:
    path = _join(root, ADAPTER_CONFIG)
    if not fs.exists(path):
        raise refuse(f"no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    with fs.open(path, "r") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise refuse(f"{ADAPTER_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise refuse(f"{ADAPTER_CONFIG} is not a JSON object")
    return config


def _tuple_or_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _check_config(config: dict, refuse: Callable[[str], AdapterError]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise refuse(f"peft_type {peft_type!r}: only LORA adapters can be applied")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise refuse(f"{ADAPTER_CONFIG}: r must be a positive integer, not {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise refuse(f"{ADAPTER_CONFIG}: lora_alpha must be a number, not {alpha!r}")
    variants = [k for k in VARIANT_FIELDS if config.get(k)]
    if variants:
        raise refuse(
            f"LoRA variant {', '.join(variants)}: merged otherwise than W + scale * B @ A, "
            "not supported"
        )
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise refuse(
            f"init_lora_weights={config['init_lora_weights']!r} rewrites the base weights when "
            "PEFT loads the adapter; convert it to a plain LoRA first (PEFT's "
            "path_initial_model_for_weight_conversion)"
        )
    unsupported = [k for k in UNSUPPORTED_FIELDS if config.get(k)]
    if unsupported:
        raise refuse(f"{', '.join(unsupported)} is not supported")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise refuse(f"bias={config['bias']!r} is not one of none, all, lora_only")


def _weight_files(
    fs: fsspec.AbstractFileSystem,
    root: str,
    allow_pickle: bool,
    refuse: Callable[[str], AdapterError],
) -> tuple[str, ...]:
    if fs.exists(_join(root, SAFE_WEIGHTS)):
        return (SAFE_WEIGHTS,)
    if fs.exists(_join(root, PICKLE_WEIGHTS)):
        if not allow_pickle:
            raise refuse(
                f"only pickled weights ({PICKLE_WEIGHTS}) found; refusing to unpickle an "
                "untrusted file. Convert it to safetensors or opt in with allow_pickle."
            )
        return (PICKLE_WEIGHTS,)
    raise refuse(f"no {SAFE_WEIGHTS} or {PICKLE_WEIGHTS} found")


def adapter_fingerprint(uri: str) -> str:
    """sha256 (32 hex characters) of the adapter's config as canonical JSON and the bytes
    of its weight file. Independent of where the adapter lies: the fields that record
    where it came from (``base_model_name_or_path``, ``revision``, ``peft_version``,
    ``inference_mode``) are left out; the base is fingerprinted on its own. Hashing reads
    bytes only, so a pickled ``adapter_model.bin`` is hashed without being unpickled, and
    an adapter that :func:`read_adapter` would refuse still has a fingerprint."""
    fs, root = _open_dir(uri)

    def refuse(reason: str) -> AdapterError:
        return AdapterError(f"{uri}: {reason}")

    config = _read_config(fs, root, refuse)
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC_FIELDS}
    h = hashlib.sha256(b"model-glue adapter v1\0")
    h.update(json.dumps(semantic, sort_keys=True, separators=(",", ":")).encode())
    for name in _weight_files(fs, root, True, refuse):
        h.update(b"\0" + name.encode() + b"\0")
        with fs.open(_join(root, name), "rb") as f:
            while chunk := f.read(16 * 1024 * 1024):
                h.update(chunk)
    return h.hexdigest()[:32]


class _AdapterWeights:
    """The adapter's tensors: shapes from the safetensors header, each value read when
    asked (a pickle, allowed by the caller, is loaded whole with ``weights_only``)."""

    def __init__(self, info: AdapterInfo) -> None:
        self.fs, self.root = _open_dir(info.uri)
        self.file = info.weight_files[0]
        path = _join(self.root, self.file)
        self._loaded: dict[str, torch.Tensor] | None = None
        if self.file == SAFE_WEIGHTS:
            self._infos, _ = read_safetensors_header(self.fs, path, self.file)
            self.shapes = {n: tuple(i.shape) for n, i in self._infos.items()}
        else:
            with self.fs.open(path, "rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()
            ):
                raise AdapterError(f"{info.uri}/{self.file}: not a state dict of tensors")
            self._loaded = state
            self.shapes = {n: tuple(t.shape) for n, t in state.items()}

    def tensor(self, name: str) -> torch.Tensor:
        if self._loaded is not None:
            return self._loaded[name]
        info = self._infos[name]
        with self.fs.open(_join(self.root, self.file), "rb") as f:
            f.seek(info.begin)
            data = f.read(info.nbytes)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(bytearray(data), dtype=info.torch_dtype).reshape(info.shape)


@dataclass(frozen=True)
class _Delta:
    """A LoRA update of one base tensor: adapter tensor names and how to combine them."""

    kind: str  # "linear" | "embedding" | "bias"
    a: str | None  # lora_A (None for a lora_B bias)
    b: str
    scaling: float
    transpose: bool = False


@dataclass
class _Edit:
    """What happens to one base tensor: replaced by an adapter tensor, then updated."""

    replace: str | None = None
    deltas: list[_Delta] = field(default_factory=list)


@dataclass
class _Plan:
    edits: dict[str, _Edit]
    shapes: dict[str, tuple[int, ...]]  # of the output tensors
    vocab: int | None  # rows of resized vocabulary tensors (None: unchanged)
    lora_modules: int


def _split_key(key: str) -> tuple[str, str | None, str | None]:
    """(module path in the model, LoRA part or None, replaced tensor or None) of an adapter
    tensor name. ``base_model.model.`` is PEFT's prefix; ``.base_layer`` marks a wrapped
    module's own weight (saved embedding layers, biases trained with ``bias="all"``)."""
    name = key.removeprefix(PEFT_PREFIX)
    m = _LORA_KEY.match(name)
    if m:
        return m["module"], m["part"], None
    return name.rpartition(".")[0], None, name.replace(".base_layer.", ".")


def _base_name(rel: str, base_tensors: Mapping[str, object]) -> str | None:
    """The base tensor that PEFT's ``rel`` (a tensor name inside the model it wrapped)
    names: itself, with ``model.`` added (an adapter of a bare ``LlamaModel`` applied to a
    ``ForCausalLM`` checkpoint) or with leading modules removed (the other way round)."""
    candidates = [rel, "model." + rel]
    parts = rel.split(".")
    candidates += [".".join(parts[i:]) for i in range(1, len(parts) - 1)]
    return next((c for c in candidates if c in base_tensors), None)


def _plan(info: AdapterInfo, weights: _AdapterWeights, base: Checkpoint) -> _Plan:
    """Map every adapter tensor onto the base tensor it changes and check every shape,
    from headers alone, before anything is computed or written."""

    def refuse(reason: str) -> AdapterError:
        return AdapterError(f"{info.uri}: {reason} (base {base.uri})")

    if base.config.get("quantization_config"):
        raise refuse("the base is quantized (config.json has quantization_config)")
    layout = _layout(base)
    edits: dict[str, _Edit] = {}
    shapes = {n: tuple(t.shape) for n, t in base.tensors.items()}
    lora: dict[str, dict[str, str]] = {}
    for key in weights.shapes:
        if _IGNORED.search(key):
            continue
        module, part, replaced = _split_key(key)
        if part is not None:
            lora.setdefault(module, {})[part] = key
        elif ".lora_" in key or "lora_magnitude_vector" in key:
            raise refuse(f"adapter tensor {key!r} is not a plain LoRA weight")
        else:
            target = _base_name(replaced, base.tensors)
            if target is None:
                raise refuse(f"adapter tensor {key!r} has no matching base tensor")
            edits.setdefault(target, _Edit()).replace = key
    vocab = _check_replacements(edits, weights, base, layout, shapes, refuse)
    for module, parts in sorted(lora.items()):
        target, delta = _lora_delta(info, module, parts, weights, base, layout, shapes, refuse)
        edits.setdefault(target, _Edit()).deltas.append(delta)
        if "lora_B.bias" in parts:
            bias = _lora_bias_target(parts["lora_B.bias"], target, weights, shapes, refuse)
            edits.setdefault(bias, _Edit()).deltas.append(
                _Delta("bias", None, parts["lora_B.bias"], delta.scaling)
            )
    for name in edits:
        if not base.tensors[name].torch_dtype.is_floating_point:
            raise refuse(f"base tensor {name!r} is {base.tensors[name].dtype}, not a float")
    _check_tied_head(edits, base, layout, refuse)
    return _Plan(edits, shapes, vocab, len(lora))


def _layout(base: Checkpoint) -> Layout | None:
    try:
        return base.layout
    except LayoutError:
        return None


def _check_replacements(
    edits: dict[str, _Edit],
    weights: _AdapterWeights,
    base: Checkpoint,
    layout: Layout | None,
    shapes: dict[str, tuple[int, ...]],
    refuse: Callable[[str], AdapterError],
) -> int | None:
    """Check each replaced tensor's shape and set ``shapes`` to the output's. The token
    embedding and head may have more (or fewer) rows: an adapter that added tokens saves
    them resized. Returns their common row count when it differs from the base's."""
    vocab_tensors = set(layout.embeddings[:1]) | {layout.head} if layout else set()
    base_vocab = vocab_size(base.config)
    rows: set[int] = set()
    for target, edit in edits.items():
        new, old = weights.shapes[edit.replace], shapes[target]
        if new == old:
            continue
        resized = target in vocab_tensors and len(new) == len(old) and new[1:] == old[1:]
        if not resized:
            raise refuse(
                f"shape mismatch: adapter tensor {edit.replace!r} is {list(new)}, base tensor "
                f"{target!r} is {list(old)}"
            )
        shapes[target] = new
        rows.add(new[0])
    if len(rows) > 1:
        raise refuse(f"resized vocabulary tensors disagree on their rows ({sorted(rows)})")
    vocab = rows.pop() if rows else None
    return vocab if vocab != base_vocab else None


def _lora_delta(
    info: AdapterInfo,
    module: str,
    parts: dict[str, str],
    weights: _AdapterWeights,
    base: Checkpoint,
    layout: Layout | None,
    shapes: Mapping[str, tuple[int, ...]],
    refuse: Callable[[str], AdapterError],
) -> tuple[str, _Delta]:
    """The base tensor of LoRA ``module`` and its update, shapes checked as PEFT's
    ``load_state_dict`` would."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_part, b_part = (
        ("lora_embedding_A", "lora_embedding_B")
        if embedding
        else ("lora_A.weight", "lora_B.weight")
    )
    missing = [p for p in (a_part, b_part) if p not in parts]
    if missing:
        raise refuse(f"LoRA module {module!r} has no {missing[0]}")
    a_key, b_key = parts[a_part], parts[b_part]
    target = _base_name(module + ".weight", base.tensors)
    if target is None:
        raise refuse(f"adapter tensor {a_key!r} has no matching base tensor ({module}.weight)")
    a, b, w = weights.shapes[a_key], weights.shapes[b_key], shapes[target]
    r = info.rank(module)

    def mismatch(why: str) -> AdapterError:
        return refuse(
            f"shape mismatch: {a_key!r} is {list(a)}, {b_key!r} is {list(b)}, base tensor "
            f"{target!r} is {list(w)} ({why})"
        )

    if len(a) != 2 or len(b) != 2 or len(w) != 2:
        raise mismatch("LoRA of 2-d weights only")
    if a[0] != r or b[1] != r:
        raise mismatch(f"rank {r} in {ADAPTER_CONFIG}")
    scaling = info.scaling(module)
    if embedding:  # lora_embedding_A is [r, num_embeddings], B [embedding_dim, r]
        if w != (a[1], b[0]):
            raise mismatch("embedding LoRA needs [num_embeddings, embedding_dim]")
        return target, _Delta("embedding", a_key, b_key, scaling, transpose=True)
    return target, _Delta(
        "linear", a_key, b_key, scaling, _transposed(target, a, b, w, layout, mismatch)
    )


def _lora_bias_target(
    key: str,
    weight: str,
    weights: _AdapterWeights,
    shapes: Mapping[str, tuple[int, ...]],
    refuse: Callable[[str], AdapterError],
) -> str:
    """The base bias that ``lora_B.bias`` (``lora_bias=True``) adds to."""
    bias = weight.removesuffix(".weight") + ".bias"
    if bias not in shapes:
        raise refuse(f"adapter tensor {key!r}: lora_bias needs base tensor {bias!r}")
    if shapes[bias] != weights.shapes[key]:
        raise refuse(
            f"shape mismatch: adapter tensor {key!r} is {list(weights.shapes[key])}, "
            f"base tensor {bias!r} is {list(shapes[bias])}"
        )
    return bias


def _transposed(
    target: str,
    a: tuple[int, ...],
    b: tuple[int, ...],
    w: tuple[int, ...],
    layout: Layout | None,
    mismatch: Callable[[str], AdapterError],
) -> bool:
    """Whether the base weight is stored ``[in, out]`` (GPT-2's ``Conv1D``). PEFT decides
    ``fan_in_fan_out`` by the module's type, overriding the config's flag, so this goes by
    the base: the shapes when the weight is not square, else the architecture's layout."""
    out_in, in_out = (b[0], a[1]), (a[1], b[0])
    if w == out_in and w != in_out:
        return False
    if w == in_out and w != out_in:
        return True
    if w == out_in:  # square
        return bool(layout and layout.transposed and target in layout.projections)
    raise mismatch("lora_B @ lora_A must have the base weight's shape")


def _check_tied_head(
    edits: Mapping[str, _Edit],
    base: Checkpoint,
    layout: Layout | None,
    refuse: Callable[[str], AdapterError],
) -> None:
    """A base that ties its head to the token embedding but stores both: a change to the
    head alone would be ignored when the output loads (transformers ties them again)."""
    if not base.config.get("tie_word_embeddings") or layout is None or layout.head is None:
        return
    if layout.head in edits:
        raise refuse(
            f"the base ties {layout.head!r} to the token embedding; the adapter changes it "
            "(untie the base first: tie_word_embeddings=false)"
        )


def _apply_edit(edit: _Edit, tensor: torch.Tensor, weights: _AdapterWeights) -> torch.Tensor:
    """One output tensor: PEFT's load (replacement, in the base dtype) then its merge."""
    if edit.replace is not None:
        tensor = weights.tensor(edit.replace).to(tensor.dtype, copy=True)
    for d in edit.deltas:
        b = weights.tensor(d.b).float()
        if d.kind == "bias":
            tensor += b * d.scaling
            continue
        delta = b @ weights.tensor(d.a).float()
        if d.transpose:
            delta = delta.T
        delta = delta * d.scaling
        if d.kind == "embedding":  # PEFT rounds the embedding's delta to its dtype first
            delta = delta.to(tensor.dtype)
        tensor += delta  # computed in float32, rounded once to the tensor's dtype
    return tensor


def apply_adapter(
    adapter_uri: str,
    base_uri: str,
    out_dir: str | Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    shard_size: int = 2 * 1024**3,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``base_uri`` with the LoRA adapter ``adapter_uri`` merged in as a Hugging Face
    directory at ``out_dir`` (local), exactly as PEFT's ``merge_and_unload`` would.

    Holds one base tensor at a time plus the adapter tensors it needs. ``config.json`` is
    the base's (its vocab_size follows resized embeddings); the tokenizer files come from
    the adapter directory when it has its own tokenizer, else from the base, and
    ``generation_config.json`` likewise from the adapter's if any; a README.md names
    both. The output is built in a temporary
    sibling and renamed when complete; an existing ``out_dir`` must be empty (a store's
    staging directory) unless ``overwrite``. ``progress(done, total)`` is called after each
    tensor. Returns a summary: tensors written, changed by LoRA, replaced; base and
    output vocabulary; dtype; shards; the adapter's fingerprint; seconds."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: output directory already exists and is not empty")
    info = read_adapter(adapter_uri, allow_pickle=allow_pickle)
    base = Checkpoint(base_uri)
    weights = _AdapterWeights(info)
    plan = _plan(info, weights, base)
    names = list(base.tensors)
    outputs = [OutputTensor(n, base.tensors[n].torch_dtype, plan.shapes[n]) for n in names]
    fingerprint = adapter_fingerprint(adapter_uri)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writer = ShardedWriter(tmp, outputs, shard_size)
        try:
            for i, name in enumerate(names):
                tensor = base.tensor(name)
                if name in plan.edits:
                    tensor = _apply_edit(plan.edits[name], tensor, weights)
                writer.write(name, tensor)
                del tensor
                if progress is not None:
                    progress(i + 1, len(names))
        finally:
            writer.close()
        writer.finish()
        tokenizer_from = _write_companions(info, base, plan, tmp)
        summary = {
            "adapter": adapter_uri,
            "base": base_uri,
            "adapter_fingerprint": fingerprint,
            "tensors": len(names),
            "changed": sum(1 for e in plan.edits.values() if e.deltas),
            "replaced": sum(1 for e in plan.edits.values() if e.replace is not None),
            "lora_modules": plan.lora_modules,
            "base_vocab": vocab_size(base.config),
            "vocab": plan.vocab or vocab_size(base.config),
            "dtype": _dtype_name(base),
            "tokenizer_from": tokenizer_from,
            "shards": list(writer.names),
        }
        (tmp / "README.md").write_text(_model_card(info, summary))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = time.perf_counter() - start
    return summary


def _dtype_name(base: Checkpoint) -> str:
    return str(SAFETENSORS_DTYPES[base.main_dtype]).removeprefix("torch.")


def _write_companions(info: AdapterInfo, base: Checkpoint, plan: _Plan, out: Path) -> str:
    """config.json (the base's, its vocab_size following resized embeddings),
    generation_config.json (the adapter's if it has one, else the base's) and the tokenizer
    files: all from the adapter directory when it ships a tokenizer of its own (an adapter
    that added tokens must), else all from the base, never a mix. Returns where the
    tokenizer came from."""
    (out / "config.json").write_text(
        json.dumps(_output_config(base, plan), indent=2, sort_keys=True)
    )
    afs, aroot = _open_dir(info.uri)
    adapter_tokenizer = any(afs.exists(_join(aroot, n)) for n in TOKENIZER_VOCABS)
    adapter_dir, base_dir = (afs, aroot), (base.fs, base.root)
    adapter_generation = afs.exists(_join(aroot, "generation_config.json"))
    _copy_files(
        *(adapter_dir if adapter_generation else base_dir), ("generation_config.json",), out
    )
    _copy_files(*(adapter_dir if adapter_tokenizer else base_dir), TOKENIZER_FILES, out)
    return "adapter" if adapter_tokenizer else "base"


def _output_config(base: Checkpoint, plan: _Plan) -> dict:
    config = output_config(base, SAFETENSORS_DTYPES[base.main_dtype])
    if plan.vocab is not None:
        if "vocab_size" in config:
            config["vocab_size"] = plan.vocab
        elif isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "vocab_size": plan.vocab}
    return config


def _copy_files(fs: fsspec.AbstractFileSystem, root: str, names, out: Path) -> None:
    for name in names:
        if fs.exists(_join(root, name)):
            with fs.open(_join(root, name), "rb") as f:
                (out / name).write_bytes(f.read())


def _model_card(info: AdapterInfo, summary: Mapping[str, Any]) -> str:
    front = {
        "library_name": "transformers",
        "tags": ["model-glue", "lora", "merged-adapter"],
        "base_model": summary["base"],
    }
    scale = "lora_alpha / sqrt(r) (rsLoRA)" if info.use_rslora else "lora_alpha / r"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# LoRA adapter merged into its base",
        "",
        f"- base: `{summary['base']}`",
        f"- adapter: `{summary['adapter']}` (fingerprint `{summary['adapter_fingerprint']}`)",
        f"- adapter's own base: `{info.base_model_name_or_path}`",
        f"- LoRA: r={info.r}, lora_alpha={info.lora_alpha}, scale {scale}"
        + (", per-module rank/alpha patterns" if info.rank_pattern or info.alpha_pattern else ""),
        f"- tensors changed by LoRA: {summary['changed']}, replaced by the adapter's: "
        f"{summary['replaced']} (of {summary['tensors']})",
        f"- vocabulary: {summary['vocab']} (base {summary['base_vocab']}); tokenizer from the "
        f"{summary['tokenizer_from']}",
        f"- dtype: {summary['dtype']} (each update summed in float32, as PEFT's merge_and_unload)",
        "",
        "Made with model-glue's `apply_adapter`: W' = W + scale * (B @ A) for every LoRA module.",
        "",
    ]
    return "\n".join(lines)
