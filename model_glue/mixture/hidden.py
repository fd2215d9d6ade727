"""Pooled hidden states entering decoder layers: what every router in this package reads.

The paper's ``hidden`` router and the model-level router both look at the residual stream
*entering* a layer. Forward pre-hooks capture exactly that for every architecture (no
reliance on how a transformers version numbers ``output_hidden_states``), and the forward stops
as soon as the deepest requested layer has been seen, so a router at layer k costs k layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model_glue.architectures import layers_path

Pooling = Literal["last", "mean", "first"]
POOLINGS: tuple[str, ...] = ("last", "mean", "first")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: Pooling) -> torch.Tensor:
    """Pool [B, T, H] states over real tokens only (``mask`` 1 for tokens, 0 for padding)."""
    if how not in POOLINGS:
        raise ValueError(f"pooling {how!r} is not one of {', '.join(POOLINGS)}")
    mask = mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    real = mask > 0
    if how == "last":
        idx = torch.where(real, positions, -1).max(1).values
    else:
        idx = torch.where(real, positions, mask.shape[1]).min(1).values
    return hidden[torch.arange(hidden.shape[0]), idx.clamp(0, mask.shape[1] - 1)]


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's decoder layers, where its architecture keeps them (the catalog's
    ``layers`` path: ``model.layers``, ``transformer.h``, ``gpt_neox.layers``...)."""
    path = layers_path(model.config.to_dict(), model.state_dict().keys())
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        layers = None
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at {path or 'any path'}")
    return layers


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask; long texts keep their *last* tokens, where the question is."""
    rows = [tokenizer(t)["input_ids"][-max_length:] for t in texts]
    rows = [r if r else [tokenizer.pad_token_id or 0] for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


class _Enough(Exception):
    """Raised by a hook to end a forward once the deepest wanted layer input is captured."""


@torch.no_grad()
def layer_inputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    pooling: Pooling = "last",
    batch_size: int = 32,
) -> torch.Tensor:
    """Pooled hidden states entering each of ``layers``: a [len(layers), len(texts), H] tensor."""
    blocks = decoder_layers(model)
    wanted = sorted(set(layers))
    if wanted and (wanted[0] < 0 or wanted[-1] >= len(blocks)):
        raise ValueError(
            f"layer indices {list(layers)} out of range for a {len(blocks)}-layer model"
        )
    max_length = int(getattr(model.config, "max_position_embeddings", 2048))
    out = torch.empty(len(layers), len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        ids, mask = encode(tokenizer, texts[start : start + batch_size], max_length)
        captured: dict[int, torch.Tensor] = {}

        def hook(module, args, kwargs, layer, mask=mask, captured=captured):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[layer] = pool(hidden.float(), mask, pooling)
            if layer == wanted[-1]:
                raise _Enough

        handles = [
            blocks[i].register_forward_pre_hook(
                lambda m, a, k, i=i, hook=hook: hook(m, a, k, i), with_kwargs=True
            )
            for i in wanted
        ]
        try:
            model(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                use_cache=False,
            )
        except _Enough:
            pass
        finally:
            for h in handles:
                h.remove()
        for row, layer in enumerate(layers):
            out[row, start : start + len(ids)] = captured[layer].cpu()
    return out
