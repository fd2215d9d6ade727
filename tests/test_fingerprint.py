import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_glue.checkpoint import Checkpoint, CheckpointError
from model_glue.fingerprint import fingerprint_checkpoint, stat_signature


def test_fingerprint_is_stable_and_location_independent(tiny_llama, tmp_path):
    a = tiny_llama("a", seed=1)
    fp1 = fingerprint_checkpoint(str(a))
    fp2 = fingerprint_checkpoint(str(a))
    assert fp1 == fp2
    moved = tmp_path / "moved"
    a.rename(moved)
    assert fingerprint_checkpoint(str(moved)).fingerprint == fp1.fingerprint
    assert fp1.architecture == "LlamaForCausalLM"
    assert fp1.param_count == sum(
        t.numel() for t in load_file(moved / "model.safetensors").values()
    )
    assert fp1.dtype == "F32" and len(fp1.fingerprint) == 32


def test_one_changed_tensor_changes_content_but_not_architecture(tiny_llama):
    a = tiny_llama("a", seed=1)
    before = fingerprint_checkpoint(str(a))
    sd = load_file(a / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = sd[name].clone()
    sd[name][0, 0] += 1e-3
    save_file(sd, a / "model.safetensors", metadata={"format": "pt"})
    after = fingerprint_checkpoint(str(a))
    assert after.content_hash != before.content_hash
    assert after.fingerprint != before.fingerprint
    assert after.arch_signature == before.arch_signature


def test_resharding_keeps_the_fingerprint(tiny_llama, tmp_path):
    a = tiny_llama("a", seed=3)
    sd = load_file(a / "model.safetensors")
    names = sorted(sd)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((a / "config.json").read_text())
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, sharded / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert (
        fingerprint_checkpoint(str(sharded)).content_hash
        == fingerprint_checkpoint(str(a)).content_hash
    )
    assert Checkpoint(str(sharded)).weight_files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_bf16_and_other_architecture_change_the_right_parts(tiny_llama):
    a = tiny_llama("a", seed=1)
    b = tiny_llama("b", seed=1, dtype="bfloat16")
    c = tiny_llama("c", seed=1, hidden=32)
    fa, fb, fc = (fingerprint_checkpoint(str(p)) for p in (a, b, c))
    assert (
        fb.dtype == "BF16"
        and fb.arch_signature == fa.arch_signature
        and fb.content_hash != fa.content_hash
    )
    assert fc.arch_signature != fa.arch_signature


def test_truncated_file_is_named(tiny_llama):
    a = tiny_llama("a")
    f = a / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        Checkpoint(str(a))


def test_corrupt_header_and_missing_dir_are_named(tiny_llama, tmp_path):
    a = tiny_llama("a")
    f = a / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint(str(a))
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(str(tmp_path / "nope"))


def test_pickled_weights_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        Checkpoint(str(d))


def test_stat_signature_tracks_touches(tiny_llama):
    a = tiny_llama("a")
    s1 = stat_signature(str(a))
    assert stat_signature(str(a)) == s1
    (a / "config.json").write_text((a / "config.json").read_text() + " ")
    assert stat_signature(str(a)) != s1


def test_fsspec_memory_checkpoint(tiny_llama):
    import fsspec

    a = tiny_llama("a", seed=5)
    fs = fsspec.filesystem("memory")
    for f in a.iterdir():
        fs.pipe(f"/zoo/a/{f.name}", f.read_bytes())
    remote = Checkpoint("memory://zoo/a")
    local = Checkpoint(str(a))
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(remote.tensor(name), local.tensor(name))
    assert (
        fingerprint_checkpoint("memory://zoo/a").content_hash
        == fingerprint_checkpoint(str(a)).content_hash
    )
