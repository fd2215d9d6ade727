"""Checks that experts share the layout a weight-level mixture needs.

FFN-level and block-level mixtures put one model's tensors beside another's, so the experts
must agree on every shape and on the tokenizer. Model-level mixtures need none of this: each
expert keeps its own tokenizer and architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model_glue.architectures import Architecture, lookup
from model_glue.architectures.catalog import block_refusal, moe_refusal
from model_glue.mixture.errors import MixtureError

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


def family_of(model: PreTrainedModel) -> Architecture | None:
    """The catalog entry of a loaded model (None: the catalog lacks its architecture)."""
    return lookup(model.config.to_dict())


def require_moe_family(model: PreTrainedModel, name: str) -> str:
    """The FFN-level MoE builder for ``model``'s family (``mixtral``, ``qwen2_moe``...);
    a :class:`MixtureError` naming the supported families for any other."""
    if why := moe_refusal(model.config.to_dict()):
        raise MixtureError(f"{name}: {why}")
    arch = family_of(model)
    if getattr(model.config, "mlp_bias", False):
        raise MixtureError(f"{name}: {arch.name} with MLP biases has no MoE counterpart")
    return arch.moe_builder


def require_block_family(model: PreTrainedModel, name: str) -> None:
    """Block-level mixtures are built from Llama decoders (LlamaDecoderLayer modules)."""
    if why := block_refusal(model.config.to_dict()):
        raise MixtureError(f"{name}: {why} (use a model-level mixture for other architectures)")
    if getattr(model.config, "mlp_bias", False) or getattr(model.config, "attention_bias", False):
        raise MixtureError(f"{name}: Llama with biases is not supported by block-level mixtures")


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
