"""Greedy text-in, text-out generation for the mixtures' convenience ``generate`` methods.

Evaluation goes through lm-eval (``MixtureLM`` delegates to ``HFLM``); this is for notebooks and
smoke checks, so it favours obviously-correct (one text at a time, no padding) over speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_new_tokens: int,
    until: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations, cut at the first stop string of ``until``."""
    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, -(limit - max_new_tokens) :]
        gen = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=torch.ones_like(ids).to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad if pad is not None else 0,
        )
        completion = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        cuts = [completion.find(s) for s in until if s and s in completion]
        out.append(completion[: min(cuts)] if cuts else completion)
    return out
