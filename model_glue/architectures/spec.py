"""What the catalog declares about one architecture: tensor roles, as data.

An :class:`Architecture` says where a checkpoint keeps its decoder layers and what each
tensor in them is for (attention q/k/v/o or a fused qkv; MLP gate/up/down, a fused gate_up
or fc_in/fc_out; MoE experts, routers and a shared expert), how its projection weights are
laid out (``[out, in]``, or ``[in, out]`` for GPT-2's ``Conv1D``), its embeddings, output head
and final norm. Paths are written without the ``.weight`` suffix; ``{e}`` stands for an
expert's number. Nothing outside :mod:`model_glue.architectures` knows a tensor name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# role -> similarity group. Routers (MoE gates) are not projections of the residual stream
# into a feature space the paper compares: they stay out of every group.
ATTENTION_ROLES = ("q", "k", "v", "o", "qkv")
MLP_ROLES = ("gate", "up", "down", "gate_up", "fc_in", "fc_out")
EXPERT_ROLES = (
    "expert_gate",
    "expert_up",
    "expert_down",
    "shared_gate",
    "shared_up",
    "shared_down",
)
ROUTER_ROLES = ("router", "shared_router")

# config.json keys under their common names (raw config.json files keep each family's own)
CONFIG_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "hidden_size": ("hidden_size", "n_embd", "d_model"),
        "num_hidden_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
        "num_attention_heads": ("num_attention_heads", "n_head", "n_heads"),
        "intermediate_size": ("intermediate_size", "n_inner", "ffn_hidden_size"),
        "vocab_size": ("vocab_size", "padded_vocab_size"),
    }
)


def config_value(config: Mapping, key: str):
    """``config[key]`` under any of its aliases (``n_embd`` for ``hidden_size``...), also
    inside a multimodal config's ``text_config``; None when absent."""
    for source in (config, config.get("text_config") or {}):
        for alias in CONFIG_ALIASES.get(key, (key,)):
            if source.get(alias) is not None:
                return source[alias]
    return None


def role_group(role: str) -> str | None:
    """The similarity group of a role: ``attn``, ``mlp``, or None (routers)."""
    if role in ATTENTION_ROLES:
        return "attn"
    if role in MLP_ROLES or role in EXPERT_ROLES:
        return "mlp"
    return None


def _frozen(m: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True)
class Architecture:
    """One architecture's declared layout (see the module docstring).

    ``names``: ``config.architectures[0]`` values it matches; ``model_types``: the
    ``model_type`` values it matches when ``architectures`` is missing. ``layers``: the
    module path of the decoder layers (tensor names are ``{layers}.{i}.{path}.weight``).
    ``attention`` / ``mlp``: role -> path inside a layer; ``moe``: the roles of a sparse MLP
    (a layer holds either every ``mlp`` role or every ``moe`` role). ``moe_builder``: the
    FFN-level mixture this family's experts are written as (None: not supported).
    """

    name: str
    family: str
    names: tuple[str, ...]
    model_types: tuple[str, ...]
    layers: str
    attention: Mapping[str, str]
    mlp: Mapping[str, str]
    embeddings: tuple[str, ...]
    head: str | None
    final_norm: str | None
    norms: tuple[str, ...] = ()
    moe: Mapping[str, str] = field(default_factory=lambda: _frozen(None))
    transposed: bool = False  # Conv1D weights [in, out]
    moe_builder: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention", _frozen(self.attention))
        object.__setattr__(self, "mlp", _frozen(self.mlp))
        object.__setattr__(self, "moe", _frozen(self.moe))
        for role in (*self.attention, *self.mlp, *self.moe):
            if role not in (*ATTENTION_ROLES, *MLP_ROLES, *EXPERT_ROLES, *ROUTER_ROLES):
                raise ValueError(f"architecture {self.name}: unknown role {role!r}")

    @property
    def roles(self) -> dict[str, str]:
        """Every role of a layer -> its path (dense and sparse MLP roles together)."""
        return {**self.attention, **self.mlp, **self.moe}

    def describe(self) -> str:
        parts = [
            "attention " + "/".join(self.attention),
            "MLP " + "/".join(self.mlp) if self.mlp else "",
            "MoE experts" if self.moe else "",
            "Conv1D [in, out]" if self.transposed else "",
        ]
        return ", ".join(p for p in parts if p)
