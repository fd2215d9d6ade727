"""The declared architectures. One entry each; the README's table is generated from here
(``glue architectures --markdown``) and a test keeps the two equal.

Every entry is checked by ``tests/test_architectures.py`` against a tiny random model that
transformers builds from the family's config: every 2-D weight of a layer has a role, and
every role is found.
"""

from __future__ import annotations

from model_glue.architectures.spec import Architecture

# bump when a declaration changes what a tensor is (similarity groups, layer numbers, checks)
ARCHITECTURES_VERSION = "1"

_LLAMA_ATTENTION = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
}
_GATED_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


def _decoder(
    name: str,
    family: str,
    model_type: str,
    *,
    also: tuple[str, ...] = (),
    attention: dict | None = None,
    mlp: dict | None = None,
    moe: dict | None = None,
    norms: tuple[str, ...] = _LLAMA_NORMS,
    final_norm: str = "model.norm",
    moe_builder: str | None = None,
) -> Architecture:
    """A decoder under ``model.layers`` with ``model.embed_tokens`` and ``lm_head`` (the
    shape most hub families share)."""
    return Architecture(
        name=name,
        family=family,
        names=(name, *also),
        model_types=(model_type,),
        layers="model.layers",
        attention=attention or _LLAMA_ATTENTION,
        mlp=_GATED_MLP if mlp is None else mlp,
        moe=moe or {},
        embeddings=("model.embed_tokens",),
        head="lm_head",
        final_norm=final_norm,
        norms=norms,
        moe_builder=moe_builder,
    )


_FUSED_QKV = {"qkv": "self_attention.query_key_value", "o": "self_attention.dense"}
_DENSE_4H = {"fc_in": "mlp.dense_h_to_4h", "fc_out": "mlp.dense_4h_to_h"}


def _transformer_h(
    name: str,
    family: str,
    *,
    norms: tuple[str, ...],
    also: tuple[str, ...] = (),
    model_types: tuple[str, ...] | None = None,
    attention: dict = _FUSED_QKV,
    mlp: dict = _DENSE_4H,
    embeddings: tuple[str, ...] = ("transformer.word_embeddings",),
    transposed: bool = False,
) -> Architecture:
    """A decoder under ``transformer.h`` with ``lm_head`` and ``transformer.ln_f`` (GPT-2
    and the families that kept its names; the defaults are Falcon's and Bloom's)."""
    return Architecture(
        name=name,
        family=family,
        names=(name, *also),
        model_types=model_types or (family,),
        layers="transformer.h",
        attention=attention,
        mlp=mlp,
        embeddings=embeddings,
        head="lm_head",
        final_norm="transformer.ln_f",
        norms=norms,
        transposed=transposed,
    )


_QWEN_MOE = {
    "router": "mlp.gate",
    "expert_gate": "mlp.experts.{e}.gate_proj",
    "expert_up": "mlp.experts.{e}.up_proj",
    "expert_down": "mlp.experts.{e}.down_proj",
}

ARCHITECTURES: tuple[Architecture, ...] = (
    _decoder("LlamaForCausalLM", "llama", "llama", moe_builder="mixtral"),
    _decoder("MistralForCausalLM", "mistral", "mistral", moe_builder="mixtral"),
    _decoder(
        "MixtralForCausalLM",
        "mixtral",
        "mixtral",
        mlp={},
        moe={
            "router": "block_sparse_moe.gate",
            "expert_gate": "block_sparse_moe.experts.{e}.w1",
            "expert_down": "block_sparse_moe.experts.{e}.w2",
            "expert_up": "block_sparse_moe.experts.{e}.w3",
        },
    ),
    _decoder("Qwen2ForCausalLM", "qwen2", "qwen2", moe_builder="qwen2_moe"),
    _decoder(
        "Qwen2MoeForCausalLM",
        "qwen2_moe",
        "qwen2_moe",
        moe={
            **_QWEN_MOE,
            "shared_gate": "mlp.shared_expert.gate_proj",
            "shared_up": "mlp.shared_expert.up_proj",
            "shared_down": "mlp.shared_expert.down_proj",
            "shared_router": "mlp.shared_expert_gate",
        },
    ),
    _decoder("Qwen3ForCausalLM", "qwen3", "qwen3", moe_builder="qwen3_moe"),
    _decoder("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3_moe", moe=_QWEN_MOE),
    _decoder("GemmaForCausalLM", "gemma", "gemma"),
    _decoder(
        "Gemma2ForCausalLM",
        "gemma2",
        "gemma2",
        norms=(*_LLAMA_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    ),
    _decoder(
        "Gemma3ForCausalLM",
        "gemma3",
        "gemma3_text",
        norms=(*_LLAMA_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    ),
    _decoder(
        "PhiForCausalLM",
        "phi",
        "phi",
        attention={**_LLAMA_ATTENTION, "o": "self_attn.dense"},
        mlp={"fc_in": "mlp.fc1", "fc_out": "mlp.fc2"},
        norms=("input_layernorm",),
        final_norm="model.final_layernorm",
    ),
    _decoder(
        "Phi3ForCausalLM",
        "phi3",
        "phi3",
        attention={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj"},
        mlp={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
    ),
    _decoder("StableLmForCausalLM", "stablelm", "stablelm"),
    _decoder("OlmoForCausalLM", "olmo", "olmo", norms=()),
    _decoder(
        "Olmo2ForCausalLM",
        "olmo2",
        "olmo2",
        norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
    _decoder("CohereForCausalLM", "cohere", "cohere", norms=("input_layernorm",)),
    _decoder("GraniteForCausalLM", "granite", "granite"),
    _decoder(
        "Starcoder2ForCausalLM",
        "starcoder2",
        "starcoder2",
        mlp={"fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj"},
    ),
    Architecture(
        name="GPTNeoXForCausalLM",
        family="gpt_neox",
        names=("GPTNeoXForCausalLM",),
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        attention={"qkv": "attention.query_key_value", "o": "attention.dense"},
        mlp=_DENSE_4H,
        embeddings=("gpt_neox.embed_in",),
        head="embed_out",
        final_norm="gpt_neox.final_layer_norm",
        norms=_LLAMA_NORMS,
    ),
    _transformer_h(
        "GPT2LMHeadModel",
        "gpt2",
        also=("GPT2Model",),
        attention={"qkv": "attn.c_attn", "o": "attn.c_proj"},
        mlp={"fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj"},
        embeddings=("transformer.wte", "transformer.wpe"),
        norms=("ln_1", "ln_2"),
        transposed=True,
    ),
    _transformer_h(
        "GPTBigCodeForCausalLM",
        "gpt_bigcode",
        attention={"qkv": "attn.c_attn", "o": "attn.c_proj"},
        mlp={"fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj"},
        embeddings=("transformer.wte", "transformer.wpe"),
        norms=("ln_1", "ln_2"),
    ),
    _transformer_h(
        "GPTJForCausalLM",
        "gptj",
        attention={
            "q": "attn.q_proj",
            "k": "attn.k_proj",
            "v": "attn.v_proj",
            "o": "attn.out_proj",
        },
        mlp={"fc_in": "mlp.fc_in", "fc_out": "mlp.fc_out"},
        embeddings=("transformer.wte",),
        norms=("ln_1",),
    ),
    _transformer_h(
        "FalconForCausalLM",
        "falcon",
        also=("RWForCausalLM",),
        model_types=("falcon", "RefinedWebModel", "RefinedWeb"),
        norms=("input_layernorm", "ln_attn", "ln_mlp", "post_attention_layernorm"),
    ),
    _transformer_h("BloomForCausalLM", "bloom", norms=_LLAMA_NORMS),
    Architecture(
        name="MptForCausalLM",
        family="mpt",
        names=("MptForCausalLM", "MPTForCausalLM"),
        model_types=("mpt",),
        layers="transformer.blocks",
        attention={"qkv": "attn.Wqkv", "o": "attn.out_proj"},
        mlp={"fc_in": "ffn.up_proj", "fc_out": "ffn.down_proj"},
        embeddings=("transformer.wte",),
        head="lm_head",
        final_norm="transformer.norm_f",
        norms=("norm_1", "norm_2"),
    ),
)

BY_NAME: dict[str, Architecture] = {n: a for a in ARCHITECTURES for n in a.names}
BY_MODEL_TYPE: dict[str, Architecture] = {t: a for a in ARCHITECTURES for t in a.model_types}

# block-level mixtures run the experts' layers as LlamaDecoderLayer modules
BLOCK_LEVEL_FAMILIES = ("llama",)

# FFN-level mixtures: the MoE class each builder writes (see model_glue.mixture.ffn_moe)
MOE_BUILDERS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM"}  # fmt: skip


def lookup(config: dict) -> Architecture | None:
    """The declared architecture of a config.json: by ``architectures[0]``, else by
    ``model_type``; None when the catalog lacks it."""
    archs = config.get("architectures") or []
    if archs and archs[0] in BY_NAME:
        return BY_NAME[archs[0]]
    if not archs:
        return BY_MODEL_TYPE.get(config.get("model_type") or "")
    return None


def _found(config: dict, arch: Architecture | None) -> str:
    return arch.name if arch else (config.get("architectures") or [config.get("model_type")])[0]


def moe_refusal(config: dict) -> str | None:
    """Why a model with this ``config.json`` cannot give its MLPs to an FFN-level mixture
    (written as its family's MoE model); None: it can."""
    arch = lookup(config)
    if arch is None or arch.moe_builder is None:
        return f"an FFN-level mixture cannot be built from {_found(config, arch)}; " + (
            "supported: " + "; ".join(moe_families())
        )
    return None


def block_refusal(config: dict) -> str | None:
    """Why a model with this ``config.json`` cannot give its decoder layers to a
    block-level mixture (built from Llama layers); None: it can."""
    arch = lookup(config)
    if arch is None or arch.family not in BLOCK_LEVEL_FAMILIES:
        return (
            f"a block-level mixture cannot be built from {_found(config, arch)}; "
            "supported: LlamaForCausalLM"
        )
    return None


def moe_families() -> list[str]:
    """Architectures whose dense models an FFN-level mixture can combine, with what it writes."""
    return [f"{a.name} -> {MOE_BUILDERS[a.moe_builder]}" for a in ARCHITECTURES if a.moe_builder]


def markdown_table() -> str:
    """The README's table of supported architectures."""
    rows = [
        "| architecture | `model_type` | layers | roles | FFN-level MoE |",
        "|---|---|---|---|---|",
    ]
    for a in ARCHITECTURES:
        moe = f"as {MOE_BUILDERS[a.moe_builder]}" if a.moe_builder else ""
        names = ", ".join(f"`{n}`" for n in a.names)
        types = ", ".join(f"`{t}`" for t in a.model_types)
        rows.append(f"| {names} | {types} | `{a.layers}` | {a.describe()} | {moe} |")
    return "\n".join(rows)
