"""FFN-level mixture: a transformers MoE model assembled from dense experts of one family.

Attention, embeddings and norms come from one (merged) base model; expert e of every layer is
source model e's MLP; one gate per layer routes each token to its top-k experts. What is
written depends on the family (the catalog's ``moe_builder``): Llama and Mistral experts make a
``MixtralForCausalLM``, Qwen2 experts a ``Qwen2MoeForCausalLM``, Qwen3 experts a
``Qwen3MoeForCausalLM``.

The first ``dense_layers`` layers can instead keep the base's own MLP (the hybrid variant).
Qwen MoE configs have dense layers of their own (``mlp_only_layers``); Mixtral has none, so
there every expert slot holds the base's MLP, and since the top-k weights sum to one the
layer computes exactly the dense MLP whatever the gate says.

Qwen2-MoE adds an always-on shared expert with a sigmoid gate: it is the base's MLP, its gate
is zero (a weight of 1/2) and the routed experts' down projections are halved, so a layer
computes 1/2 base MLP + 1/2 routed mixture (a mixture of identical experts is the base).

Layout (transformers 5.x): in memory every one of these MoE blocks fuses its experts into
``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up) and ``mlp.experts.down_proj``
[E, H, I]; ``save_pretrained`` writes each family's per-expert names (Mixtral's
``block_sparse_moe.experts.{e}.w1/w2/w3``, as mergekit-moe and vLLM expect) and
``from_pretrained`` fuses them back. We fill the in-memory module and let transformers write it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from model_glue.architectures import Architecture, lookup
from model_glue.mixture.layout import (
    require_moe_family,
    require_same_layout,
    require_same_tokenizer,
)
from model_glue.mixture.loading import (
    MixtureError,
    ModelSource,
    atomic_directory,
    describe_source,
    first_tokenizer,
    load_model,
    model_name,
    try_tokenizer,
)
from model_glue.mixture.prompts import PromptsInput
from model_glue.mixture.record import MIXTURE_FILE
from model_glue.mixture.routers import RouterInit, init_gates

# the base config's keys that never carry over to the MoE config
_NOT_COPIED = {"architectures", "model_type", "transformers_version", "auto_map", "_name_or_path",
               "dtype", "torch_dtype", "layer_types", "mlp_only_layers"}  # fmt: skip


@dataclass(frozen=True)
class MoeTarget:
    """What an FFN-level mixture of one family is written as."""

    config_class: str
    num_experts_key: str
    expert_size_key: str | None  # None: experts have the dense intermediate size
    shared_expert: bool = False  # Qwen2-MoE: the base's MLP, always on
    dense_layers_key: str | None = None  # a list of layers that keep a dense MLP


TARGETS: dict[str, MoeTarget] = {
    "mixtral": MoeTarget("MixtralConfig", "num_local_experts", None),
    "qwen2_moe": MoeTarget(
        "Qwen2MoeConfig", "num_experts", "moe_intermediate_size", True, "mlp_only_layers"
    ),
    "qwen3_moe": MoeTarget(
        "Qwen3MoeConfig", "num_experts", "moe_intermediate_size", False, "mlp_only_layers"
    ),
}


def default_top_k(num_experts: int) -> int:
    """The paper's default: top-2, or top-1 when there are only two experts."""
    return 1 if num_experts <= 2 else 2


def moe_config(
    base: PreTrainedModel, builder: str, num_experts: int, top_k: int, dense_layers: int = 0
) -> PretrainedConfig:
    """The MoE config whose attention, norms and RoPE reproduce the dense ``base`` exactly."""
    target = TARGETS[builder]
    cls = getattr(transformers, target.config_class)
    known = set(cls().to_dict())
    src = base.config.to_dict()
    kwargs = {k: v for k, v in src.items() if k in known and k not in _NOT_COPIED}
    kwargs[target.num_experts_key] = num_experts
    kwargs["num_experts_per_tok"] = top_k
    if target.expert_size_key:
        kwargs[target.expert_size_key] = base.config.intermediate_size
        kwargs["norm_topk_prob"] = True  # top-k weights sum to one, as Mixtral's
        kwargs["decoder_sparse_step"] = 1
    if target.shared_expert:
        kwargs["shared_expert_intermediate_size"] = base.config.intermediate_size
    if target.dense_layers_key:
        kwargs[target.dense_layers_key] = list(range(dense_layers))
    if "router_jitter_noise" in known:
        kwargs["router_jitter_noise"] = 0.0
    return cls(**kwargs)


def _dense_mlp(
    arch: Architecture, state: dict[str, torch.Tensor], layer: int
) -> dict[str, torch.Tensor]:
    """``gate``, ``up``, ``down`` weights of a dense expert's layer, by the catalog's roles."""
    out = {}
    for role in ("gate", "up", "down"):
        key = f"{arch.layers}.{layer}.{arch.mlp[role]}.weight"
        if key not in state:
            raise MixtureError(f"{arch.name}: no tensor {key!r} for the experts' MLP")
        out[role] = state[key]
    return out


@torch.no_grad()
def assemble_moe(
    base: PreTrainedModel,
    experts: Sequence[PreTrainedModel],
    gates: torch.Tensor,
    *,
    top_k: int,
    dense_layers: int = 0,
) -> PreTrainedModel:
    """The in-memory MoE model; ``gates`` [layers, E, H] are used from layer ``dense_layers`` on."""
    builder = require_moe_family(base, "base")
    target = TARGETS[builder]
    cfg = moe_config(base, builder, len(experts), top_k, dense_layers)
    moe = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # the experts have the base's MoE builder (checked by the builder), and every family with
    # one keeps its MLP as model.layers.N.mlp.{gate,up,down}_proj: the base's names are theirs
    arch = lookup(base.config.to_dict())
    src = base.state_dict()
    dst = moe.state_dict()
    states = [m.state_dict() for m in experts]  # once each: names -> their tensors
    filled = set()
    mlp_paths = {f".{p}." for p in arch.mlp.values()}
    for key, tensor in src.items():
        if key in dst and not any(p in key + "." for p in mlp_paths):
            dst[key].copy_(tensor)
            filled.add(key)
    own_dense = target.dense_layers_key is not None
    for layer in range(cfg.num_hidden_layers):
        prefix = f"{arch.layers}.{layer}.mlp"
        if layer < dense_layers and own_dense:  # a plain MLP: the base's own
            for role, t in _dense_mlp(arch, src, layer).items():
                key = f"{prefix}.{role}_proj.weight"
                dst[key].copy_(t)
                filled.add(key)
            continue
        owners = [src] * len(experts) if layer < dense_layers else states
        mlps = [_dense_mlp(arch, state, layer) for state in owners]
        down_scale = 0.5 if target.shared_expert else 1.0
        dst[f"{prefix}.experts.gate_up_proj"].copy_(
            torch.stack([torch.cat([m["gate"], m["up"]]) for m in mlps])
        )
        dst[f"{prefix}.experts.down_proj"].copy_(
            torch.stack([m["down"] for m in mlps]) * down_scale
        )
        gate = gates[layer] if layer >= dense_layers else torch.zeros_like(gates[layer])
        dst[f"{prefix}.gate.weight"].copy_(gate)
        filled |= {
            f"{prefix}.experts.gate_up_proj",
            f"{prefix}.experts.down_proj",
            f"{prefix}.gate.weight",
        }
        if target.shared_expert:
            for role, t in _dense_mlp(arch, src, layer).items():
                dst[f"{prefix}.shared_expert.{role}_proj.weight"].copy_(t)
                filled.add(f"{prefix}.shared_expert.{role}_proj.weight")
            dst[f"{prefix}.shared_expert_gate.weight"].zero_()  # sigmoid(0) = 1/2
            filled.add(f"{prefix}.shared_expert_gate.weight")
    missing = sorted(set(dst) - filled)
    if cfg.tie_word_embeddings:  # a tied head shares a filled tensor's storage
        shared = {dst[f].data_ptr() for f in filled}
        missing = [k for k in missing if dst[k].data_ptr() not in shared]
    if missing:
        raise MixtureError(f"base model has no tensor for {type(moe).__name__}'s {missing[0]!r}")
    return moe


def build_ffn_moe(
    base_uri_or_model: ModelSource,
    expert_uris: Sequence[ModelSource],
    out_dir: str | Path,
    *,
    top_k: int | None = None,
    router: RouterInit | None = None,
    prompts: PromptsInput | None = None,
    dense_layers: int = 0,
    expert_names: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write an MoE directory of the experts' family (Mixtral, Qwen2-MoE or Qwen3-MoE;
    loadable by ``AutoModelForCausalLM``).

    ``base_uri_or_model`` supplies attention, embeddings, norms, the tokenizer and the hidden
    states the router is initialised from; ``expert_uris`` supply one MLP each per layer.
    ``dense_layers`` = k keeps the base's MLP in the first k layers (hybrid mixture).
    """
    router = router or RouterInit()
    names = (
        list(expert_names)
        if expert_names
        else [model_name(s, i) for i, s in enumerate(expert_uris)]
    )
    if len(names) != len(expert_uris) or len(set(names)) != len(names):
        raise MixtureError(f"expert names {names} must be unique, one per expert")
    if len(expert_uris) < 2:
        raise MixtureError("an FFN-level mixture needs at least two experts")
    base = load_model(base_uri_or_model, "base")
    experts = [load_model(s, f"expert {n}") for s, n in zip(expert_uris, names, strict=True)]
    all_names = ["base", *names]
    builders = {
        n: require_moe_family(m, n) for m, n in zip([base, *experts], all_names, strict=True)
    }
    if len(set(builders.values())) > 1:
        raise MixtureError(f"FFN-level mixture: experts of different families ({builders})")
    require_same_layout([base, *experts], all_names)
    tok = tokenizer or first_tokenizer([base_uri_or_model, *expert_uris])
    require_same_tokenizer([tok, *[try_tokenizer(s) for s in expert_uris]], all_names)
    num_layers = base.config.num_hidden_layers
    if not 0 <= dense_layers <= num_layers:
        raise MixtureError(f"dense_layers = {dense_layers} must be in 0..{num_layers}")
    k = top_k if top_k is not None else default_top_k(len(experts))
    if not 1 <= k <= len(experts):
        raise MixtureError(f"top_k = {k} must be in 1..{len(experts)}")
    gates = init_gates(router, base, tok, prompts, names, range(num_layers))
    moe = assemble_moe(base, experts, gates, top_k=k, dense_layers=dense_layers)
    with atomic_directory(out_dir) as tmp:
        moe.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        record = {
            "format": "model-glue-mixture",
            "version": 1,
            "kind": "hybrid" if dense_layers else "ffn_moe",
            "experts": [
                {"name": n, "source": describe_source(s)}
                for n, s in zip(names, expert_uris, strict=True)
            ],
            "base": describe_source(base_uri_or_model),
            "top_k": k,
            "dense_layers": dense_layers,
            "router": router.to_dict(),
        }
        (tmp / MIXTURE_FILE).write_text(json.dumps(record, indent=2))
    return Path(out_dir).absolute()
