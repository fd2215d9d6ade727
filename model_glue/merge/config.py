"""Merge configs in YAML: ours, and mergekit's (so mergekit users can switch).

Ours::

    method: ties
    base: ./zoo/base
    models:
      - {uri: ./zoo/add, name: add, params: {weight: 0.6, density: 0.5}}
      - {uri: ./zoo/next, params: {density: [0.3, 0.7]}}   # gradient over depth
    params: {lambda: 1.0}
    dtype: bfloat16            # optional; default: the inputs' dtype
    tokenizer_source: base     # optional: base (default) or a model's name/uri (the config)
    vocab: error               # or truncate / pad (rows by index), or instead:
    tokenizer: union           # union / base / a model: rows matched by token, as mergekit
    chat_template: auto        # with tokenizer: auto, a model's name or a Jinja template

``tokenizer`` may also be mergekit's mapping ``{source: ..., pad_to_multiple_of: N}``.
mergekit's (``merge_method``, ``base_model``, ``models: [{model, parameters}]``,
``parameters``, ``dtype``/``out_dtype``, ``tokenizer_source``, ``tokenizer``,
``chat_template``) is translated for the methods we support. Where mergekit's defaults
differ from ours they are written in explicitly, so the same file gives the same merge in
both tools (see docs/merging.md).

Relative paths are resolved against the config file's folder, then the working
directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from model_glue.merge.params import MergeConfigError
from model_glue.merge.registry import get_method
from model_glue.merge.spec import MergeSpec, ModelInput, default_name
from model_glue.merge.tokenizer import SOURCES

OUR_KEYS = {
    "method",
    "base",
    "models",
    "params",
    "dtype",
    "tokenizer_source",
    "vocab",
    "tokenizer",
    "chat_template",
}
MERGEKIT_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "slices",
    "modules",
}
# mergekit 0.1.5 defaults that differ from ours, made explicit on import.
MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "ties": {"density": 1.0},
    "dare_ties": {"density": 1.0, "normalize": False, "rescale": "l1"},
    "dare_linear": {"density": 1.0, "rescale": "l1"},
    "breadcrumbs": {"density": 1.0},
    "breadcrumbs_ties": {"density": 1.0, "normalize": False},
    "della": {"density": 1.0},
    "della_linear": {"density": 1.0},
}


def load_merge_config(path: str | Path) -> MergeSpec:
    """Read a merge config (ours or mergekit-style); errors name the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MergeConfigError(f"{path}: merge config not found") from None
    except yaml.YAMLError as e:
        raise MergeConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise MergeConfigError(f"{path}: a merge config is a mapping, got {type(data).__name__}")
    try:
        if "merge_method" in data:
            return _from_mergekit(data, path.parent)
        return _from_ours(data, path.parent)
    except MergeConfigError as e:
        raise MergeConfigError(f"{path}: {e}") from None


def parse_merge_config(data: dict, root: Path | None = None) -> MergeSpec:
    """Same as :func:`load_merge_config` for an already-parsed mapping."""
    root = root or Path.cwd()
    return _from_mergekit(data, root) if "merge_method" in data else _from_ours(data, root)


def _resolve_path(uri: Any, root: Path, key: str) -> str:
    if not isinstance(uri, str) or not uri:
        raise MergeConfigError(f"{key}: expected a path or URL, got {uri!r}")
    if "://" in uri or Path(uri).is_absolute():
        return uri
    for candidate in (root / uri, Path.cwd() / uri):
        if candidate.exists():
            return str(candidate.resolve())
    return str((root / uri).resolve())


def _from_ours(data: dict, root: Path) -> MergeSpec:
    unknown = set(data) - OUR_KEYS
    if unknown:
        raise MergeConfigError(f"unknown keys {sorted(unknown)} (allowed: {sorted(OUR_KEYS)})")
    if "method" not in data:
        raise MergeConfigError("missing key 'method'")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergeConfigError("'models' must be a non-empty list")
    inputs = []
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"uri": m}
        if not isinstance(m, dict) or "uri" not in m:
            raise MergeConfigError(f"models[{i}]: expected a path or a mapping with 'uri'")
        extra = set(m) - {"uri", "name", "params"}
        if extra:
            raise MergeConfigError(
                f"models[{i}]: unknown keys {sorted(extra)} (allowed: uri, name, params)"
            )
        inputs.append(
            ModelInput(
                _resolve_path(m["uri"], root, f"models[{i}].uri"),
                m.get("name"),
                dict(m.get("params") or {}),
            )
        )
    base = data.get("base")
    source, pad = tokenizer_setting(data.get("tokenizer"), "tokenizer")
    labels = {m.label for m in inputs} | ({default_name(base)} if isinstance(base, str) else set())
    if source is not None and source not in (*SOURCES, *labels):
        source = _resolve_path(source, root, "tokenizer")
    return MergeSpec(
        method=data["method"],
        models=inputs,
        base=_resolve_path(base, root, "base") if base is not None else None,
        params=dict(data.get("params") or {}),
        dtype=data.get("dtype"),
        tokenizer_source=data.get("tokenizer_source"),
        vocab=data.get("vocab", "error"),
        tokenizer=source,
        pad_to_multiple_of=pad,
        chat_template=data.get("chat_template"),
    )


def tokenizer_setting(value: Any, key: str) -> tuple[str | None, int | None]:
    """(source, pad_to_multiple_of) of a ``tokenizer`` setting: ``union``, ``base``, a
    model, or mergekit's mapping ``{source, pad_to_multiple_of, tokens}`` (source default
    ``union``, as mergekit's); per-token ``tokens`` are refused."""
    if value is None or isinstance(value, str):
        return value, None
    if not isinstance(value, dict):
        raise MergeConfigError(
            f"{key}: expected union, base, a model or a mapping with 'source', got {value!r}"
        )
    unknown = set(value) - {"source", "tokens", "pad_to_multiple_of"}
    if unknown:
        raise MergeConfigError(
            f"{key}: unknown keys {sorted(unknown)} (allowed: source, pad_to_multiple_of)"
        )
    if value.get("tokens"):
        raise MergeConfigError(
            f"{key}.tokens (per-token embedding sources) is not supported; remove it and rows "
            "follow the merge's rule (see docs/merging.md, Vocabularies)"
        )
    source = value.get("source", "union")
    if not isinstance(source, str):
        raise MergeConfigError(f"{key}.source: expected union, base or a model, got {source!r}")
    return source, value.get("pad_to_multiple_of")


def _from_mergekit(data: dict, root: Path) -> MergeSpec:
    unknown = set(data) - MERGEKIT_KEYS
    if unknown:
        raise MergeConfigError(f"unknown mergekit keys {sorted(unknown)}")
    if data.get("modules") is not None:
        raise MergeConfigError("mergekit key 'modules' is not supported by this engine")
    if data.get("slices") is not None:
        from model_glue.merge.stack import parse_slices

        for key in ("tokenizer", "chat_template"):
            if data.get(key) is not None:
                raise MergeConfigError(f"mergekit key {key!r} is not supported with 'slices'")
        if data.get("tokenizer_source") not in (None, "base"):
            raise MergeConfigError(
                "tokenizer_source other than base is not supported with 'slices'"
            )
        if data.get("models") is not None:
            raise MergeConfigError("give either 'slices' or 'models', not both")
        return parse_slices(data, lambda p, key: _resolve_path(p, root, key))
    name = data["merge_method"]
    method = get_method(name)
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergeConfigError("'models' must be a non-empty list")
    base = data.get("base_model")
    base = _resolve_path(base, root, "base_model") if base is not None else None
    inputs = []
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise MergeConfigError(f"models[{i}]: expected a mapping with 'model'")
        uri = _resolve_path(m["model"], root, f"models[{i}].model")
        if base is not None and uri == base and method.base != "none":
            continue  # mergekit lists the base among the models; it enters as the base only
        inputs.append(ModelInput(uri, None, dict(m.get("parameters") or {})))
    source, pad = _mergekit_tokenizer(data)
    if source not in (None, *SOURCES):
        source = _resolve_path(source, root, "tokenizer_source")
    reference = None
    if method.base == "none" and base is not None:
        # mergekit merges an unlisted base_model as one more (last) input of the methods
        # without a base; it stays the reference (config, tokenizer, preferred rows).
        if base not in {m.uri for m in inputs}:
            inputs.append(ModelInput(base))
        reference = base
        base = None
    params = {**MERGEKIT_DEFAULTS.get(name, {}), **dict(data.get("parameters") or {})}
    return MergeSpec(
        method=name,
        models=inputs,
        base=base,
        params=params,
        dtype=data.get("out_dtype") or data.get("dtype"),
        tokenizer_source=reference,
        tokenizer=source,
        pad_to_multiple_of=pad,
        chat_template=data.get("chat_template"),
    )


def _mergekit_tokenizer(data: dict) -> tuple[str | None, int | None]:
    """mergekit's ``tokenizer_source`` or ``tokenizer:`` (not both, as mergekit); a
    ``chat_template`` alone re-saves the base's tokenizer with it (``tokenizer: base``)."""
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise MergeConfigError("give tokenizer_source or tokenizer, not both (as mergekit)")
    if data.get("tokenizer") is not None:
        source, pad = tokenizer_setting(data["tokenizer"], "tokenizer")
    else:
        source, pad = data.get("tokenizer_source"), None
    if source is None and data.get("chat_template") is not None:
        source = "base"
    return source, pad
