"""Checks that experts share the layout a weight-level mixture needs.

FFN-level and block-level mixtures put one model's tensors beside another's, so the experts
must agree on every shape and on the tokenizer. Model-level mixtures need none of this: each
expert keeps its own tokenizer and architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model_glue.mixture.loading import MixtureError

SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
)


def require_llama(model: PreTrainedModel, name: str) -> None:
    """Weight-level mixtures are built from dense Llama decoders (gate/up/down MLPs, no biases)."""
    cfg = model.config
    if cfg.model_type != "llama":
        raise MixtureError(
            f"{name}: model_type {cfg.model_type!r} is not supported (expected 'llama')"
        )
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise MixtureError(f"{name}: Llama with biases cannot be converted to a Mixtral layout")


def require_same_layout(models: Sequence[PreTrainedModel], names: Sequence[str]) -> None:
    """Refuse, naming the first differing model and key, unless all configs agree on shapes."""
    ref = models[0].config
    for model, name in zip(models[1:], names[1:], strict=True):
        for key in SHAPE_KEYS:
            a, b = getattr(ref, key, None), getattr(model.config, key, None)
            if a != b:
                raise MixtureError(
                    f"{name}: config.{key} = {b!r} differs from {names[0]}'s {a!r}; "
                    "weight-level mixtures need experts of one architecture (use a model-level mixture)"
                )


def require_same_tokenizer(
    tokenizers: Sequence[PreTrainedTokenizerBase | None], names: Sequence[str]
) -> None:
    """Token ids must mean the same thing in every expert whose layers are mixed."""
    known = [(t, n) for t, n in zip(tokenizers, names, strict=True) if t is not None]
    if not known:
        return
    ref, ref_name = known[0]
    vocab = ref.get_vocab()
    for tok, name in known[1:]:
        if tok.get_vocab() != vocab:
            raise MixtureError(
                f"{name}: tokenizer differs from {ref_name}'s; weight-level mixtures need one shared "
                "tokenizer (use a model-level mixture, which routes on text)"
            )
