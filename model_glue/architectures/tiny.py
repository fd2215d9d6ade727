"""Tiny random models of every declared architecture, built offline by transformers.

For tests and trials of the catalog: a base of each family and "fine-tunes" of it (the
base plus seeded Gaussian noise), saved as Hugging Face directories of a few kilobytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

# architecture -> (transformers config class, its own keyword arguments)
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 24}
TINY: dict[str, tuple[str, dict]] = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {}),
    "MixtralForCausalLM": ("MixtralConfig", {"num_local_experts": 3, "num_experts_per_tok": 2}),
    "Qwen2ForCausalLM": ("Qwen2Config", {"tie_word_embeddings": True}),
    "Qwen2MoeForCausalLM": (
        "Qwen2MoeConfig",
        {"num_experts": 3, **_MOE, "shared_expert_intermediate_size": 48},
    ),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 8}),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", {"num_experts": 3, **_MOE, "head_dim": 8}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 8}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 8}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"head_dim": 8}),
    "PhiForCausalLM": ("PhiConfig", {}),
    "Phi3ForCausalLM": ("Phi3Config", {}),
    "StableLmForCausalLM": ("StableLmConfig", {}),
    "OlmoForCausalLM": ("OlmoConfig", {}),
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    "CohereForCausalLM": ("CohereConfig", {}),
    "GraniteForCausalLM": ("GraniteConfig", {}),
    "Starcoder2ForCausalLM": ("Starcoder2Config", {}),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", {}),
    "GPT2LMHeadModel": ("GPT2Config", {}),
    "GPTBigCodeForCausalLM": ("GPTBigCodeConfig", {}),
    "GPTJForCausalLM": ("GPTJConfig", {"rotary_dim": 4}),
    "FalconForCausalLM": ("FalconConfig", {"num_kv_heads": 4}),
    "BloomForCausalLM": ("BloomConfig", {}),
    "MptForCausalLM": ("MptConfig", {}),
}
_COMMON = {  # every family's own names for the same sizes (unknown keys are ignored)
    "hidden_size": 32, "n_embd": 32, "d_model": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64,
}  # fmt: skip


def tiny_config(arch: str, *, vocab: int = 64, layers: int = 2):
    """A transformers config of ``arch`` (a catalog name) with kilobyte-sized weights."""
    import transformers

    cls_name, extra = TINY[arch]
    cls = getattr(transformers, cls_name)
    known = set(cls().to_dict())
    kw = {k: v for k, v in _COMMON.items() if k in known}
    for k in ("num_hidden_layers", "n_layer", "n_layers"):
        if k in known:
            kw[k] = layers
    kw.update(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=1, **extra)
    return cls(**kw)


def save_tiny(
    path: str | Path,
    arch: str,
    *,
    seed: int = 0,
    base: str | Path | None = None,
    noise: float = 0.05,
    dtype: str = "float32",
    vocab: int = 64,
    layers: int = 2,
    tokenizer=None,
    max_shard_size: str | None = None,
) -> Path:
    """Save a tiny random ``arch`` model at ``path``; with ``base``, a fine-tune of it (the
    base's weights plus seeded noise of relative size ``noise``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                scale = p.abs().mean().clamp_min(1e-3)
                p.add_(noise * scale * torch.randn(p.shape, generator=g))
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab=vocab, layers=layers))
    model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return Path(path)
