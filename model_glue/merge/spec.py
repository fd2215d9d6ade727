"""What to merge: :class:`MergeSpec`, validated once against the method's declaration."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model_glue.merge.params import MergeConfigError, Param, check_setting
from model_glue.merge.registry import MergeMethod, get_method

# Part of every merged artifact's content key: bump it when outputs may change bits.
# 2: sign election in fewer passes; DARE l1 sums over 256K-element blocks.
ENGINE_VERSION = "merge-engine-2"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "half": "float16",
    "float": "float32",
}
VOCAB_POLICIES = ("error", "truncate", "pad")


def dtype_name(value: str | torch.dtype | None) -> str | None:
    """Canonical dtype name ('bfloat16', ...) for a string or torch dtype."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for k, v in DTYPES.items():
            if v == value:
                return k
        raise MergeConfigError(f"unsupported output dtype {value}")
    name = _DTYPE_ALIASES.get(value, value.removeprefix("torch."))
    if name not in DTYPES:
        raise MergeConfigError(f"unknown dtype {value!r} (allowed: {', '.join(DTYPES)})")
    return name


def _canonical_setting(p: Param, setting: Any) -> Any:
    """Same value, same spelling: 1 and 1.0 (or true and 'inverse_density') hash alike."""
    if isinstance(setting, bool | int | float | str):
        return p.coerce(setting, p.name)
    if isinstance(setting, Mapping):
        setting = [setting]
    return [
        {"filter": e.get("filter"), "value": _canonical_setting(p, e["value"])}
        if isinstance(e, Mapping)
        else p.coerce(e, p.name)
        for e in setting
    ]


def default_name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) or uri


@dataclass(frozen=True)
class ModelInput:
    """One model to merge: where it is, what we call it, its per-model parameters."""

    uri: str
    name: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or default_name(self.uri)


@dataclass(frozen=True)
class MergeSpec:
    """A merge: method, inputs, parameters and output options.

    ``base`` is the model the task vectors are taken against (methods that need one);
    ``tokenizer_source`` is ``None``/``"base"`` (the base, else the first model) or the
    name or URI of one input: the reference, whose config the output takes; ``dtype`` is
    the output dtype (default: the reference input's).

    Vocabularies: ``tokenizer`` is ``"union"``, ``"base"`` or an input's name or URI: the
    output vocabulary, embedding/lm_head rows matched token by token as mergekit's
    ``tokenizer_source`` does (``model_glue/merge/tokenizer.py``; ``pad_to_multiple_of``
    rounds its rows up; ``chat_template``: ``auto``, an input's name or a Jinja template).
    Run-config merges use ``"union"``. Left ``None`` (the default of ``glue merge`` files),
    the reference's tokenizer files are copied and ``vocab`` says what to do with rows of
    different vocabulary sizes: ``error``, ``truncate`` or ``pad`` (by row index).
    """

    method: str
    models: Sequence[ModelInput]
    base: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = None
    vocab: str = "error"
    tokenizer: str | None = None
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        self.validate()

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    @property
    def base_name(self) -> str | None:
        return default_name(self.base) if self.base else None

    def validate(self) -> None:
        """Check everything that does not need the checkpoints; errors name the key."""
        method = get_method(self.method)
        if not self.models:
            raise MergeConfigError("a merge needs at least one entry under 'models'")
        method.check_inputs(len(self.models), self.base is not None)
        names = [m.label for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise MergeConfigError(
                f"model names must be unique; repeated: {sorted(dup)} (set 'name')"
            )
        if self.base is not None and self.base in {m.uri for m in self.models}:
            raise MergeConfigError(f"base model {self.base!r} is also listed under 'models'")
        for key, setting in self.params.items():
            check_setting(method.param(key), setting, f"params.{key}")
        for m in self.models:
            for key, setting in m.params.items():
                p = method.param(key)
                if not p.per_model:
                    raise MergeConfigError(
                        f"models[{m.label}].params.{key}: {key!r} is a global parameter of "
                        f"{method.name!r}; set it under 'params'"
                    )
                check_setting(p, setting, f"models[{m.label}].params.{key}")
        for p in method.params:
            if p.required and p.name not in self.params:
                missing = [m.label for m in self.models if p.name not in m.params]
                if not p.per_model or missing:
                    where = f"models {missing}" if p.per_model else "params"
                    raise MergeConfigError(
                        f"merge method {method.name!r}: parameter {p.name!r} is required (missing for {where})"
                    )
        method.check_settings(self.params, [m.params for m in self.models], names)
        dtype_name(self.dtype)
        if self.vocab not in VOCAB_POLICIES:
            raise MergeConfigError(
                f"vocab={self.vocab!r} is not one of {', '.join(VOCAB_POLICIES)}"
            )
        self.tokenizer_index()
        self._validate_vocabulary()

    def _validate_vocabulary(self) -> None:
        if self.tokenizer is None:
            for key in ("pad_to_multiple_of", "chat_template"):
                if getattr(self, key) is not None:
                    raise MergeConfigError(f"{key} needs tokenizer: union, base or a model")
            return
        if self.vocab != "error":
            raise MergeConfigError(
                f"give tokenizer: {self.tokenizer} (rows matched by token) or vocab: {self.vocab} "
                "(rows cut or padded by index), not both"
            )
        self.vocabulary_source()
        pad = self.pad_to_multiple_of
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise MergeConfigError(f"pad_to_multiple_of must be a positive integer, got {pad!r}")
        if self.chat_template is not None:
            from model_glue.merge.tokenizer import check_chat_template

            check_chat_template(self.chat_template, [name for name, _ in self.inputs()])

    def vocabulary_source(self) -> str:
        """``tokenizer`` as the vocabulary code takes it: union, base or an input's name."""
        if self.tokenizer in ("union", "base"):
            return self.tokenizer
        for name, uri in self.inputs():
            if self.tokenizer in (name, uri):
                return name
        raise MergeConfigError(
            f"tokenizer={self.tokenizer!r} names no input (use union, base or one of "
            f"{[name for name, _ in self.inputs()]})"
        )

    def fill_index(self) -> int | None:
        """The input whose row a token several, not all, inputs have takes where it is
        missing (mergekit's base model): the base, else an explicit ``tokenizer_source``
        (where mergekit configs put a linear merge's ``base_model``); None: their mean."""
        if self.base is not None:
            return 0
        return self.tokenizer_index() if self.tokenizer_source not in (None, "base") else None

    def tokenizer_index(self) -> int:
        """Index of the tokenizer/config source among ``inputs()`` (base first)."""
        offset = 1 if self.base else 0
        src = self.tokenizer_source
        if src in (None, "base"):
            return 0
        for i, m in enumerate(self.models):
            if src in (m.label, m.uri):
                return i + offset
        if self.base and src in (self.base, self.base_name):
            return 0
        raise MergeConfigError(
            f"tokenizer_source={src!r} names no input (use 'base' or one of {[m.label for m in self.models]})"
        )

    def inputs(self) -> list[tuple[str, str]]:
        """(name, uri) of every input, the base first when there is one."""
        out = [(self.base_name, self.base)] if self.base else []
        return out + [(m.label, m.uri) for m in self.models]

    def canonical(self) -> dict:
        """Stable, JSON-able description with every default made explicit.

        Locations (URIs) are left out on purpose: an artifact's identity is its inputs'
        content, so callers hash this together with the inputs' fingerprints (see
        :meth:`content_key`). Names stay in: DARE masks are seeded by model name.
        """
        method = self.merge_method
        out_params = {}
        for p in method.global_params:
            out_params[p.name] = _canonical_setting(p, self.params.get(p.name, p.default))
        models = []
        for m in self.models:
            mp = {}
            for p in method.per_model_params:
                setting = m.params.get(p.name, self.params.get(p.name, p.default))
                mp[p.name] = _canonical_setting(p, setting)
            models.append({"name": m.label, "params": mp})
        return json.loads(
            json.dumps(
                {
                    "method": method.name,
                    "base": self.base_name,
                    "models": models,
                    "params": out_params,
                    "dtype": dtype_name(self.dtype),
                    "tokenizer_source": self.inputs()[self.tokenizer_index()][0],
                    "vocab": self.vocab,
                    **self._canonical_vocabulary(),
                },
                sort_keys=True,
            )
        )

    def _canonical_vocabulary(self) -> dict:
        """The vocabulary settings, only when set (older content keys stay the same)."""
        if self.tokenizer is None:
            return {}
        out = {"tokenizer": self.vocabulary_source()}
        for key in ("pad_to_multiple_of", "chat_template"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def content_key(self, input_fingerprints: Mapping[str, str]) -> str:
        """sha256 over (canonical spec, input fingerprints by name, ENGINE_VERSION)."""
        fps = {}
        for name, uri in self.inputs():
            fp = input_fingerprints.get(name, input_fingerprints.get(uri))
            if fp is None:
                raise MergeConfigError(f"no fingerprint given for input {name!r} ({uri})")
            fps[name] = fp
        payload = {"spec": self.canonical(), "inputs": fps, "engine": ENGINE_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_config(self) -> dict:
        """Our YAML config form (with URIs): what reproduces this merge."""
        cfg: dict[str, Any] = {"method": self.method}
        if self.base:
            cfg["base"] = self.base
        cfg["models"] = [
            {"uri": m.uri, "name": m.label, **({"params": dict(m.params)} if m.params else {})}
            for m in self.models
        ]
        if self.params:
            cfg["params"] = dict(self.params)
        for key in ("dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        if self.vocab != "error":
            cfg["vocab"] = self.vocab
        if self.pad_to_multiple_of is not None:
            cfg["tokenizer"] = {
                "source": self.tokenizer,
                "pad_to_multiple_of": self.pad_to_multiple_of,
            }
        elif self.tokenizer is not None:
            cfg["tokenizer"] = self.tokenizer
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return cfg
