"""FFN-level mixture: a transformers ``MixtralForCausalLM`` assembled from dense Llama experts.

Attention, embeddings and norms come from one (merged) base model; expert e of every layer is
source model e's MLP; one gate per layer routes each token to its top-k experts. The first
``dense_layers`` layers can instead keep the base's own MLP (the hybrid variant): Mixtral has no
dense layers, so there every expert slot holds that same MLP, and since the top-k weights sum to
one the layer computes exactly the dense MLP whatever the gate says.

Layout (transformers 5.x): in memory Mixtral fuses each layer's experts into
``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up) and ``mlp.experts.down_proj``
[E, H, I]; ``save_pretrained`` writes the classic per-expert names
(``block_sparse_moe.experts.{e}.w1/w2/w3``, as mergekit-moe and vLLM expect) and
``from_pretrained`` fuses them back. We fill the in-memory module and let transformers write it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from model_glue.mixture.layout import require_llama, require_same_layout, require_same_tokenizer
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
from model_glue.mixture.routers import RouterInit, init_gates

MIXTURE_FILE = "mixture.json"
COPIED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def default_top_k(num_experts: int) -> int:
    """The paper's default: top-2, or top-1 when there are only two experts."""
    return 1 if num_experts <= 2 else 2


def mixtral_config(base: PreTrainedModel, num_experts: int, top_k: int) -> MixtralConfig:
    """A Mixtral config whose attention, norms and RoPE reproduce the Llama ``base`` exactly."""
    cfg = base.config
    kwargs = {k: getattr(cfg, k) for k in COPIED_KEYS if hasattr(cfg, k)}
    return MixtralConfig(
        **kwargs,
        rope_parameters=dict(cfg.rope_parameters),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        router_jitter_noise=0.0,
    )


@torch.no_grad()
def assemble_mixtral(
    base: PreTrainedModel,
    experts: Sequence[PreTrainedModel],
    gates: torch.Tensor,
    *,
    top_k: int,
    dense_layers: int = 0,
) -> MixtralForCausalLM:
    """The in-memory Mixtral; ``gates`` [layers, E, H] are used from layer ``dense_layers`` on."""
    cfg = mixtral_config(base, len(experts), top_k)
    moe = MixtralForCausalLM(cfg).eval()
    src = base.state_dict()
    dst = moe.state_dict()
    filled = set()
    for key, tensor in src.items():
        if ".mlp." not in key and key in dst:
            dst[key].copy_(tensor)
            filled.add(key)
    for layer in range(cfg.num_hidden_layers):
        owners = [base] * len(experts) if layer < dense_layers else list(experts)
        mlps = [m.model.layers[layer].mlp for m in owners]
        prefix = f"model.layers.{layer}.mlp"
        dst[f"{prefix}.experts.gate_up_proj"].copy_(
            torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in mlps])
        )
        dst[f"{prefix}.experts.down_proj"].copy_(torch.stack([m.down_proj.weight for m in mlps]))
        gate = gates[layer] if layer >= dense_layers else torch.zeros_like(gates[layer])
        dst[f"{prefix}.gate.weight"].copy_(gate)
        filled |= {
            f"{prefix}.experts.gate_up_proj",
            f"{prefix}.experts.down_proj",
            f"{prefix}.gate.weight",
        }
    missing = sorted(set(dst) - filled)
    if missing:
        raise MixtureError(f"base model has no tensor for Mixtral's {missing[0]!r}")
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
    """Write a ``MixtralForCausalLM`` directory (loadable by ``AutoModelForCausalLM``).

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
    for m, n in zip([base, *experts], all_names, strict=True):
        require_llama(m, n)
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
    moe = assemble_mixtral(base, experts, gates, top_k=k, dense_layers=dense_layers)
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
