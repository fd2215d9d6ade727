"""model_glue.adapters: a PEFT LoRA adapter applied to its base equals PEFT's own
``merge_and_unload``, bit for bit, for tiny Llama and GPT-2 bases in float32 and bfloat16;
what cannot be applied exactly is refused in one line naming the adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_glue.adapters import (
    AdapterError,
    AdapterInfo,
    adapter_fingerprint,
    apply_adapter,
    is_adapter,
    read_adapter,
)
from model_glue.architectures.tiny import save_tiny
from model_glue.checkpoint import Checkpoint, CheckpointError
from model_glue.errors import InputError

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 2, 33, 17, 4, 60]])


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Tiny random bases: (architecture, dtype) -> directory."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for arch in ("LlamaForCausalLM", "GPT2LMHeadModel"):
        for dtype in DTYPES:
            out[arch, dtype] = save_tiny(root / f"{arch}-{dtype}", arch, seed=3, dtype=dtype)
    return out


def load_base(base: Path):
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[json.loads((base / "config.json").read_text())["dtype"]]
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()


def make_adapter(base: Path, out: Path, config, *, seed: int = 0, model=None, **save_kw) -> Path:
    """``config`` applied to ``base`` by PEFT, every trainable tensor randomised with a
    seeded generator (lora_B is zero at init) and saved at ``out``."""
    model = model if model is not None else load_base(base)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(noise if "lora_" in name else p.float() + noise)
    peft_model.save_pretrained(out, **save_kw)
    return out


def peft_merged(base: Path, adapter: Path, model=None):
    """PEFT's own result: the base with the adapter loaded and merge_and_unload'ed."""
    model = model if model is not None else load_base(base)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def assert_equals_peft(out: Path, base: Path, merged) -> None:
    """Every output tensor equals PEFT's merged one exactly, in the base's dtype, and at
    least one differs from the base (the adapter did something)."""
    got, base_ck = Checkpoint(str(out)), Checkpoint(str(base))
    want = merged.state_dict()
    assert set(got.tensors) == set(base_ck.tensors)
    tied = set(want) - set(got.tensors)
    assert tied <= {"lm_head.weight"}  # a tied head: the same tensor as the token embedding
    changed = 0
    for name in got.tensors:
        t = got.tensor(name)
        assert t.dtype == want[name].dtype == base_ck.tensors[name].torch_dtype, name
        assert torch.equal(t, want[name]), name
        changed += not torch.equal(t, base_ck.tensor(name).to(t.dtype))
    assert changed


def assert_same_logits(out: Path, merged) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=merged.dtype).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, merged(IDS).logits)


CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL),
    "rslora": dict(r=8, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"up_proj": 3, "q_proj": 7},
    ),
    "modules_to_save": dict(
        r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], modules_to_save=["lm_head"]
    ),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "gate_proj"]),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_llama_equals_peft_merge(bases, tmp_path, case, dtype):
    base = bases["LlamaForCausalLM", dtype]
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(**CASES[case]))
    summary = apply_adapter(str(adapter), str(base), tmp_path / "out", shard_size=8000)
    merged = peft_merged(base, adapter)
    assert_equals_peft(tmp_path / "out", base, merged)
    assert_same_logits(tmp_path / "out", merged)
    assert summary["dtype"] == dtype
    assert len(summary["shards"]) > 1  # sharded, with an index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gpt2_conv1d_equals_peft_merge(bases, tmp_path, dtype):
    """GPT-2's Conv1D weights are [in, out]: PEFT sets fan_in_fan_out for them (c_proj is
    square, so only the architecture tells); biases trained (bias="all") replace the
    base's and lora_bias adds B's bias."""
    base = bases["GPT2LMHeadModel", dtype]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        bias="all",
        lora_bias=True,
    )
    adapter = make_adapter(base, tmp_path / "adapter", config)
    summary = apply_adapter(str(adapter), str(base), tmp_path / "out")
    merged = peft_merged(base, adapter)
    assert_equals_peft(tmp_path / "out", base, merged)
    assert_same_logits(tmp_path / "out", merged)
    assert summary["replaced"] > 0 and summary["changed"] > 0


def test_gpt2_adapter_saying_no_fan_in_fan_out(bases, tmp_path):
    """An adapter_config that says fan_in_fan_out=false for GPT-2: PEFT overrides it by
    the module type, and so does apply_adapter (c_proj alone: square weights)."""
    base = bases["GPT2LMHeadModel", "float32"]
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=2, target_modules=["c_proj"]))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    apply_adapter(str(adapter), str(base), tmp_path / "out")
    assert_equals_peft(tmp_path / "out", base, peft_merged(base, adapter))


def test_qwen2_tied_embedding_lora(tmp_path):
    """Qwen2 ties its head to the token embedding (no lm_head tensor): a LoRA on the
    embedding changes both, in PEFT's merge and in the output (which stays tied); the
    q/k/v biases trained with bias="lora_only" replace the base's."""
    base = save_tiny(tmp_path / "qwen2", "Qwen2ForCausalLM", seed=5, dtype="bfloat16")
    assert "lm_head.weight" not in Checkpoint(str(base)).tensors
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "k_proj"], bias="lora_only"
    )
    adapter = make_adapter(base, tmp_path / "adapter", config)
    summary = apply_adapter(str(adapter), str(base), tmp_path / "out")
    merged = peft_merged(base, adapter)
    assert_equals_peft(tmp_path / "out", base, merged)
    assert_same_logits(tmp_path / "out", merged)
    assert summary["replaced"] == 5  # q and k biases of two layers, the saved embedding


def test_adapter_of_a_bare_model(llama_adapter, tmp_path):
    """An adapter trained on ``LlamaModel`` (keys without ``model.``) applies to the
    ``LlamaForCausalLM`` checkpoint of the same weights."""
    base, adapter = llama_adapter
    bare = shutil.copytree(adapter, tmp_path / "bare")
    weights = load_file(bare / "adapter_model.safetensors")
    renamed = {
        k.replace("base_model.model.model.", "base_model.model."): v for k, v in weights.items()
    }
    assert set(renamed) != set(weights)
    save_file(renamed, bare / "adapter_model.safetensors")
    apply_adapter(str(bare), str(base), tmp_path / "out")
    apply_adapter(str(adapter), str(base), tmp_path / "ref")
    got, ref = Checkpoint(str(tmp_path / "out")), Checkpoint(str(tmp_path / "ref"))
    for name in ref.tensors:
        assert torch.equal(got.tensor(name), ref.tensor(name))


def test_added_tokens_resized_embeddings(bases, tmp_path):
    """An adapter that added tokens ships its tokenizer and the resized embedding and head
    (modules_to_save): the output takes both, and config.json's vocab_size follows."""
    from model_glue.zoo.tokenizer import build_char_tokenizer

    base = bases["LlamaForCausalLM", "float32"]
    tok = build_char_tokenizer()
    tok.add_tokens(["<tool>", "</tool>", "<think>"])
    vocab = 64 + 3
    model = load_base(base)
    model.resize_token_embeddings(vocab)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    adapter = make_adapter(base, tmp_path / "adapter", config, model=model)
    tok.save_pretrained(adapter)
    summary = apply_adapter(str(adapter), str(base), tmp_path / "out")
    reference = load_base(base)
    reference.resize_token_embeddings(vocab)
    merged = peft_merged(base, adapter, model=reference)
    assert_equals_peft(tmp_path / "out", base, merged)
    assert_same_logits(tmp_path / "out", merged)
    assert summary["vocab"] == vocab and summary["base_vocab"] == 64
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == vocab
    assert summary["tokenizer_from"] == "adapter"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        adapter / "tokenizer.json"
    ).read_bytes()


def test_output_directory_and_card(bases, tmp_path):
    base = bases["LlamaForCausalLM", "bfloat16"]
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"]))
    calls = []
    summary = apply_adapter(
        str(adapter), str(base), tmp_path / "out", progress=lambda d, t: calls.append((d, t))
    )
    n = len(Checkpoint(str(base)).tensors)
    assert calls == [(i, n) for i in range(1, n + 1)]
    assert summary["changed"] == 2 and summary["lora_modules"] == 2 and summary["tensors"] == n
    assert summary["tokenizer_from"] == "base"
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == (
        base / "generation_config.json"
    ).read_bytes()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(base) in card and str(adapter) in card and summary["adapter_fingerprint"] in card
    with pytest.raises(FileExistsError):
        apply_adapter(str(adapter), str(base), tmp_path / "out")
    (tmp_path / "staging").mkdir()  # an empty directory (a store's staging one) is filled
    apply_adapter(str(adapter), str(base), tmp_path / "staging")
    assert (tmp_path / "staging" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_read_adapter(bases, tmp_path):
    base = bases["LlamaForCausalLM", "float32"]
    config = LoraConfig(**CASES["patterns"], modules_to_save=["lm_head"])
    adapter = make_adapter(base, tmp_path / "adapter", config)
    info = read_adapter(str(adapter))
    assert isinstance(info, AdapterInfo)
    assert (info.peft_type, info.r, info.lora_alpha, info.bias) == ("LORA", 4, 16, "none")
    assert set(info.target_modules) == {"q_proj", "v_proj", "up_proj"}
    assert info.modules_to_save == ("lm_head",)
    assert info.weight_files == ("adapter_model.safetensors",)
    assert info.rank("model.layers.0.self_attn.v_proj") == 2
    assert info.rank("model.layers.1.self_attn.q_proj") == 6
    assert info.rank("model.layers.0.self_attn.q_proj") == 4
    assert info.scaling("model.layers.0.mlp.up_proj") == 3 / 4
    assert info.scaling("model.layers.1.self_attn.q_proj") == 7 / 6


# --- refusals ---------------------------------------------------------------------------------


def one_line(excinfo, *names: object) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert isinstance(excinfo.value, InputError)
    for n in names:
        assert str(n) in msg, (n, msg)
    return msg


@pytest.fixture
def llama_adapter(bases, tmp_path) -> tuple[Path, Path]:
    base = bases["LlamaForCausalLM", "float32"]
    return base, make_adapter(base, tmp_path / "adapter", LoraConfig(**CASES["plain"]))


def test_refuses_other_peft_types(bases, tmp_path):
    base = bases["LlamaForCausalLM", "float32"]
    ia3 = make_adapter(base, tmp_path / "ia3", IA3Config(target_modules=["k_proj", "down_proj"]))
    with pytest.raises(AdapterError) as e:
        apply_adapter(str(ia3), str(base), tmp_path / "out")
    assert "IA3" in one_line(e, ia3)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, reason",
    [
        ({"use_dora": True}, "use_dora"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"bias": "sometimes"}, "bias"),
        ({"peft_type": "LOHA"}, "LOHA"),
    ],
)
def test_refuses_edited_configs(llama_adapter, tmp_path, edit, reason):
    base, adapter = llama_adapter
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(AdapterError) as e:
        apply_adapter(str(adapter), str(base), tmp_path / "out")
    one_line(e, adapter, reason)


def test_refuses_quantized_base(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    quantized = tmp_path / "quantized"
    shutil.copytree(base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as e:
        apply_adapter(str(adapter), str(quantized), tmp_path / "out")
    one_line(e, adapter, quantized, "quantiz")


def test_pickle_only_adapter(bases, tmp_path):
    """adapter_model.bin alone is refused unless allow_pickle, then applied like the rest."""
    base = bases["LlamaForCausalLM", "bfloat16"]
    adapter = make_adapter(
        base, tmp_path / "adapter", LoraConfig(**CASES["plain"]), safe_serialization=False
    )
    assert (adapter / "adapter_model.bin").exists()
    assert not (adapter / "adapter_model.safetensors").exists()
    for call in (
        lambda: apply_adapter(str(adapter), str(base), tmp_path / "out"),
        lambda: read_adapter(str(adapter)),
    ):
        with pytest.raises(AdapterError) as e:
            call()
        one_line(e, adapter, "adapter_model.bin", "allow_pickle")
    assert not (tmp_path / "out").exists()
    assert is_adapter(str(adapter))
    assert len(adapter_fingerprint(str(adapter))) == 32  # bytes hashed, nothing unpickled
    apply_adapter(str(adapter), str(base), tmp_path / "out", allow_pickle=True)
    assert_equals_peft(tmp_path / "out", base, peft_merged(base, adapter))


def test_refuses_shape_mismatch(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    other = save_tiny(tmp_path / "wide", "LlamaForCausalLM", seed=1, vocab=64)
    config = json.loads((other / "config.json").read_text())
    weights = load_file(other / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = torch.zeros(40, 32)  # another intermediate size for this one projection
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as e:
        apply_adapter(str(adapter), str(other), tmp_path / "out")
    one_line(e, adapter, "shape mismatch", "model.layers.1.mlp.up_proj", name)


def test_refuses_adapter_tensor_without_base_tensor(bases, llama_adapter, tmp_path):
    _, adapter = llama_adapter
    gpt2 = bases["GPT2LMHeadModel", "float32"]
    with pytest.raises(AdapterError) as e:
        apply_adapter(str(adapter), str(gpt2), tmp_path / "out")
    one_line(e, adapter, "no matching base tensor", "layers.0.mlp.down_proj")


def test_refuses_unknown_lora_tensor(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(
        32
    )
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterError) as e:
        apply_adapter(str(adapter), str(base), tmp_path / "out")
    one_line(e, adapter, "lora_magnitude_vector")


def test_missing_adapter_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError) as e:
        read_adapter(str(tmp_path / "empty"))
    one_line(e, tmp_path / "empty", "adapter_config.json")
    (tmp_path / "empty" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8}'
    )
    with pytest.raises(AdapterError) as e:
        read_adapter(str(tmp_path / "empty"))
    one_line(e, tmp_path / "empty", "adapter_model.safetensors")


def test_base_errors_stay_checkpoint_errors(llama_adapter, tmp_path):
    _, adapter = llama_adapter
    with pytest.raises(CheckpointError):
        apply_adapter(str(adapter), str(tmp_path / "nowhere"), tmp_path / "out")


# --- fingerprint and detection ------------------------------------------------------------


def test_fingerprint_is_path_independent_and_content_sensitive(llama_adapter, tmp_path):
    _, adapter = llama_adapter
    fp = adapter_fingerprint(str(adapter))
    assert len(fp) == 32 and int(fp, 16) >= 0
    copy = shutil.copytree(adapter, tmp_path / "elsewhere" / "copy")
    assert adapter_fingerprint(str(copy)) == fp
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/some/other/place"
    (copy / "adapter_config.json").write_text(json.dumps(config, indent=4))
    assert adapter_fingerprint(str(copy)) == fp  # where it came from, not what it is

    weights = load_file(copy / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    weights[key][3, 1] += 1e-3
    save_file(weights, copy / "adapter_model.safetensors", metadata={"format": "pt"})
    assert adapter_fingerprint(str(copy)) != fp

    shutil.rmtree(copy)
    shutil.copytree(adapter, copy)
    config["lora_alpha"] = 9
    (copy / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_fingerprint(str(copy)) != fp


def test_is_adapter(bases, llama_adapter, tmp_path):
    base, adapter = llama_adapter
    assert is_adapter(str(adapter))
    assert not is_adapter(str(base))
    assert not is_adapter(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert not is_adapter(str(tmp_path / "empty"))
    # adapter_config.json next to a full model (config.json, no adapter weights): a model
    both = shutil.copytree(base, tmp_path / "both")
    shutil.copy(adapter / "adapter_config.json", both)
    assert not is_adapter(str(both))
    # ... and an adapter that ships its base's config.json
    shutil.copy(adapter / "adapter_model.safetensors", both)
    assert is_adapter(str(both))


def test_is_adapter_fsspec_and_apply_from_memory(llama_adapter, tmp_path):
    """Adapters (and bases) may be fsspec URLs."""
    import fsspec

    base, adapter = llama_adapter
    fs = fsspec.filesystem("memory")
    for p in adapter.iterdir():
        fs.pipe(f"/adapters/a/{p.name}", p.read_bytes())
    url = "memory://adapters/a"
    assert is_adapter(url)
    assert not is_adapter("memory://adapters/none")
    assert adapter_fingerprint(url) == adapter_fingerprint(str(adapter))
    apply_adapter(url, str(base), tmp_path / "out")
    apply_adapter(str(adapter), str(base), tmp_path / "ref")
    got, ref = Checkpoint(str(tmp_path / "out")), Checkpoint(str(tmp_path / "ref"))
    for name in ref.tensors:
        assert torch.equal(got.tensor(name), ref.tensor(name))
    fs.rm("/adapters", recursive=True)
