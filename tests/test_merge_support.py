"""Tiny Llama checkpoints for the merge tests (no test functions here)."""

from __future__ import annotations

from pathlib import Path

import torch

from model_glue.env import configure_environment

configure_environment()


def tiny_config(vocab: int = 64, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )


def save_llama(
    path: Path,
    state: dict[str, torch.Tensor],
    *,
    vocab: int = 64,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    shard: str | None = None,
    tokenizer: bool = True,
) -> Path:
    """Save ``state`` as a Hugging Face Llama directory (optionally sharded)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config(vocab, layers))
    model.load_state_dict(state)
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "5GB")
    if tokenizer:
        save_char_tokenizer(path, vocab)
    return path


def save_char_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(33 + i) for i in range(vocab - 1)]
    tok = Tokenizer(
        models.WordLevel({c: i + 1 for i, c in enumerate(chars)} | {"<unk>": 0}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def random_state(seed: int, vocab: int = 64, layers: int = 2) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    sd = LlamaForCausalLM(tiny_config(vocab, layers)).state_dict()
    g = torch.Generator().manual_seed(seed)
    # Norm weights start at exactly 1: jitter them so that every tensor has a task vector.
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()}


def fine_tune(
    base: dict[str, torch.Tensor], seed: int, scale: float = 0.02
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


def zoo(root: Path, n: int = 3, **kw) -> tuple[dict, list[dict], Path, list[Path]]:
    """A base and ``n`` fine-tunes saved under ``root``: (base sd, fine-tune sds, paths)."""
    base = random_state(0, kw.get("vocab", 64), kw.get("layers", 2))
    fts = [fine_tune(base, 100 + i) for i in range(n)]
    bpath = save_llama(root / "base", base, **kw)
    paths = [save_llama(root / f"ft{i}", sd, **kw) for i, sd in enumerate(fts)]
    return base, fts, bpath, paths
