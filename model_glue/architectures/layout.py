"""A checkpoint's layout: which tensors are which projection of which layer.

:func:`resolve_layout` reads the catalog entry of a checkpoint's architecture (or infers a
layout from tensor names and shapes when the catalog lacks it) and checks the tensors
against it: a declared architecture whose layer lacks a projection, or holds one the
architecture does not have, is a :class:`LayoutError` naming the tensor. Everything that
needs to know what a tensor is (similarity groups, layer numbers, the input-column axis,
embeddings and head) asks the :class:`Layout`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from model_glue.architectures.catalog import lookup
from model_glue.architectures.spec import Architecture, config_value, role_group
from model_glue.errors import InputError

GROUPS = ("attn", "mlp", "embed")
_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
_ATTN_WORDS = ("attn", "attention", "qkv", "query", "key", "value", "q_proj", "k_proj", "v_proj")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "fc", "4h", "gate", "up_proj", "down_proj", "expert")
_HEAD_WORDS = ("lm_head", "head", "embed_out", "output")
_EMBED_WORDS = ("emb", "tok", "wte", "wpe", "word")


class LayoutError(InputError):
    """A checkpoint's tensors do not match its declared architecture."""


@dataclass(frozen=True)
class Projection:
    """One projection matrix of a decoder layer."""

    name: str
    role: str  # a catalog role (q, gate_up, expert_down...), or "inferred"
    group: str | None  # attn | mlp | None (routers)
    layer: int


@dataclass(frozen=True)
class Layout:
    """What each tensor of one checkpoint is. ``prefix``: where its layers are in tensor
    names as stored (``model.layers``, or ``h`` for a GPT-2 saved without ``transformer.``)."""

    architecture: str
    family: str | None
    inferred: bool
    prefix: str
    num_layers: int
    transposed: bool
    projections: Mapping[str, Projection]
    embeddings: tuple[str, ...] = ()  # token embedding first
    head: str | None = None  # None: tied to the token embedding
    moe_builder: str | None = None
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_layer_re", re.compile(rf"^{re.escape(self.prefix)}\.(\d+)\."))

    @property
    def tied(self) -> bool:
        """No head of its own: the output projection is the token embedding."""
        return self.head is None

    def layer_of(self, name: str) -> int | None:
        """Decoder layer number of a tensor name; None outside the layers."""
        m = self._layer_re.match(name) if self.prefix else None  # no layers found
        return int(m.group(1)) if m else None

    def layer_filter(self, i: int) -> str:
        """A substring that names layer ``i``'s tensors and no other (mergekit ``filter``)."""
        return f"{self.prefix}.{i}."

    def group_of(self, name: str) -> str | None:
        """``attn`` / ``mlp`` for projections, ``embed`` for embeddings and head, else None."""
        if name in self.projections:
            return self.projections[name].group
        if name in self.embeddings or name == self.head:
            return "embed"
        return None

    def select(self, groups: Iterable[str]) -> list[str]:
        """The tensors of ``groups`` (``attn``, ``mlp``, ``embed``), sorted by name."""
        groups = tuple(groups)
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown tensor group(s) {sorted(unknown)}; allowed: {list(GROUPS)}")
        names = [n for n, p in self.projections.items() if p.group in groups]
        if "embed" in groups:
            names += [*self.embeddings, *([self.head] if self.head else [])]
        return sorted(names)

    def input_columns(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as ``[..., out, in]``: Conv1D projections (``[in, out]``) transposed, so
        that the paper's input columns are ``W[:, j]`` for every architecture."""
        if self.transposed and name in self.projections:
            return tensor.transpose(-1, -2)
        return tensor

    def describe(self) -> str:
        counts = Counter(p.layer for p in self.projections.values())
        per_layer = max(counts.values()) if counts else 0
        how = "inferred" if self.inferred else "declared"
        extra = ", Conv1D [in, out]" if self.transposed else ""
        tied = ", tied head" if self.tied and self.embeddings else ""
        return (
            f"layout of {self.architecture} {how}: {self.num_layers} layers, "
            f"{per_layer} projections each{extra}{tied}"
        )


def resolve_layout(
    config: Mapping, shapes: Mapping[str, tuple[int, ...]], where: str = ""
) -> Layout:
    """The layout of a checkpoint with this ``config.json`` and these tensor shapes."""
    arch = lookup(dict(config))
    if arch is None:
        return infer_layout(config, shapes)
    return declared_layout(arch, config, shapes, where or arch.name)


def _present(path: str, names: Mapping[str, object], suffix: str = "") -> str | None:
    """``path`` as stored: itself, or without leading modules (``transformer.wte`` -> ``wte``),
    as checkpoints saved from the base model are."""
    parts = path.split(".")
    for i in range(len(parts)):
        candidate = ".".join(parts[i:])
        if any(n.startswith(candidate + suffix) for n in names):
            return candidate
    return None


def _role_patterns(arch: Architecture) -> list[tuple[str, re.Pattern]]:
    return [
        (role, re.compile("^" + re.escape(path).replace(r"\{e\}", r"\d+") + r"\.weight$"))
        for role, path in arch.roles.items()
    ]


def declared_layout(
    arch: Architecture, config: Mapping, shapes: Mapping[str, tuple[int, ...]], where: str
) -> Layout:
    prefix = _present(arch.layers, shapes, ".0.")
    if prefix is None:
        raise LayoutError(f"{where}: no tensors under {arch.layers}.N ({arch.name} layout)")
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    patterns = _role_patterns(arch)
    projections: dict[str, Projection] = {}
    found: dict[int, set[str]] = {}
    for name, shape in shapes.items():
        m = layer_re.match(name)
        if m is None:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        roles = found.setdefault(layer, set())
        role = next((r for r, p in patterns if p.match(rest)), None)
        if role is not None:
            roles.add(role)
            if len(shape) == 2:
                projections[name] = Projection(name, role, role_group(role), layer)
        elif len(shape) == 2 and rest.endswith(".weight"):
            raise LayoutError(
                f"{where}: tensor {name!r} is not a projection of {arch.name} "
                f"(its layers hold {', '.join(arch.roles.values())})"
            )
    num_layers = len(found)
    for i in range(num_layers):
        if i not in found:
            raise LayoutError(
                f"{where}: no tensors for layer {i} under {prefix} ({num_layers} layers found)"
            )
        _check_layer(arch, prefix, i, found[i], where)
    declared = config_value(config, "num_hidden_layers")
    if isinstance(declared, int) and declared != num_layers:
        raise LayoutError(
            f"{where}: config.json declares {declared} layers, the tensors hold {num_layers}"
        )
    embeddings = tuple(
        f"{p}.weight" for p in (_present(e, shapes, ".weight") for e in arch.embeddings) if p
    )
    if not embeddings or embeddings[0] not in shapes:
        raise LayoutError(f"{where}: no token embedding {arch.embeddings[0]}.weight")
    head = _present(arch.head, shapes, ".weight") if arch.head else None
    return Layout(
        architecture=arch.name,
        family=arch.family,
        inferred=False,
        prefix=prefix,
        num_layers=num_layers,
        transposed=arch.transposed,
        projections=dict(sorted(projections.items())),
        embeddings=embeddings,
        head=f"{head}.weight" if head and f"{head}.weight" in shapes else None,
        moe_builder=arch.moe_builder,
    )


def _check_layer(arch: Architecture, prefix: str, i: int, roles: set[str], where: str) -> None:
    """Every attention role, and either every dense MLP role or every sparse one."""
    wanted = [dict(arch.attention)]
    mlp_forms = [f for f in (dict(arch.mlp), dict(arch.moe)) if f]
    form = next((f for f in mlp_forms if set(f) <= roles), mlp_forms[0] if mlp_forms else {})
    wanted.append(form)
    for group in wanted:
        for role, path in group.items():
            if role not in roles:
                shown = path.replace("{e}", "0")
                raise LayoutError(
                    f"{where}: tensor {prefix}.{i}.{shown}.weight is missing "
                    f"({arch.name} layers have {role})"
                )


def infer_layout(config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    """A layout from tensor names and shapes alone, for architectures the catalog lacks:
    2-D weights under the most common numbered prefix are the layers' projections; the
    Conv1D layout is recognised from the config's hidden size."""
    name = (config.get("architectures") or [config.get("model_type") or "unknown"])[0]
    counts: Counter[str] = Counter()
    for n in shapes:
        m = _NUMBERED.match(n)
        if m:
            counts[m.group(1)] += 1
    prefix = counts.most_common(1)[0][0] if counts else ""
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    layers: set[int] = set()
    mats: list[tuple[str, int, str, tuple[int, ...]]] = []
    for n, shape in shapes.items():
        m = layer_re.match(n) if prefix else None
        if m is None:
            continue
        layers.add(int(m.group(1)))
        if len(shape) == 2 and n.endswith(".weight"):
            mats.append((n, int(m.group(1)), m.group(2), tuple(shape)))
    num_layers = max(layers) + 1 if layers else 0
    hidden = config_value(config, "hidden_size")
    transposed = False
    if isinstance(hidden, int):
        in_first = sum(1 for *_, s in mats if s[0] == hidden and s[1] != hidden)
        in_last = sum(1 for *_, s in mats if s[1] == hidden and s[0] != hidden)
        transposed = in_first > in_last
    projections = {
        n: Projection(n, "inferred", _guess_group(rest, shape, hidden, transposed), layer)
        for n, layer, rest, shape in sorted(mats)
    }
    vocab = config_value(config, "vocab_size")
    outside = sorted(
        n for n, s in shapes.items()
        if len(s) == 2 and n.endswith(".weight") and n not in projections
        and (vocab is None or s[0] == vocab)
    )  # fmt: skip
    heads = [n for n in outside if any(w in n.lower() for w in _HEAD_WORDS)]
    if not heads and len(outside) > 1:  # the vocabulary matrix not named like an embedding
        heads = [n for n in outside if not any(w in n.lower() for w in _EMBED_WORDS)][:1]
    embeddings = tuple(n for n in outside if n not in heads)
    return Layout(
        architecture=name,
        family=None,
        inferred=True,
        prefix=prefix,
        num_layers=num_layers,
        transposed=transposed,
        projections=projections,
        embeddings=embeddings,
        head=heads[0] if heads else None,
    )


def layers_path(config: Mapping, names: Iterable[str]) -> str:
    """The module path of a loaded model's decoder layers: the catalog's, else the most
    common numbered prefix of its parameter names."""
    arch = lookup(dict(config))
    if arch is not None:
        return arch.layers
    return infer_layout(config, {n: (0,) for n in names}).prefix


def _guess_group(path: str, shape: tuple[int, ...], hidden, transposed: bool) -> str:
    low = path.lower()
    if any(w in low for w in _ATTN_WORDS):
        return "attn"
    if any(w in low for w in _MLP_WORDS):
        return "mlp"
    out, inp = (shape[1], shape[0]) if transposed else shape
    return "attn" if out == inp == hidden else "mlp"
