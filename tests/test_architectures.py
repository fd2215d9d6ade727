"""The architecture catalog against tiny random models of every declared family.

transformers builds each family's model offline from its config (kilobytes each); each
family runs through fingerprint, similarity (checked against the models' own Linear and
Conv1D modules, whose input axis transformers knows), clustering, a linear and a TIES merge
(against a plain computation, loaded back, tied heads still tied) and, for the families that
have an MoE counterpart, an FFN-level mixture that transformers loads and runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_glue.architectures import (
    ARCHITECTURES,
    LayoutError,
    markdown_table,
    resolve_layout,
)
from model_glue.architectures.tiny import TINY, save_tiny
from model_glue.checkpoint import Checkpoint
from model_glue.clustering import cluster_models
from model_glue.fingerprint import fingerprint_checkpoint
from model_glue.merge import MergeSpec, ModelInput, merge_to_directory
from model_glue.similarity import pairwise_similarity

ROOT = Path(__file__).resolve().parents[1]
NAMES = [a.name for a in ARCHITECTURES]


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: a base and two fine-tunes (float32, random)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, arch in enumerate(NAMES):
        base = save_tiny(root / arch / "base", arch, seed=i)
        out[arch] = {
            "base": base,
            "ft1": save_tiny(root / arch / "ft1", arch, seed=100 + i, base=base),
            "ft2": save_tiny(root / arch / "ft2", arch, seed=200 + i, base=base),
        }
    return out


def test_every_declared_architecture_has_a_tiny_model_and_the_readme_lists_them():
    assert sorted(TINY) == sorted(NAMES)
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, (
        "README's architecture table: run `glue architectures --markdown`"
    )


def test_declared_roles_cover_every_layer_weight(families):
    """Every 2-D weight of a layer has a role and every role is found (what the layout
    check enforces), with the layer count of the config."""
    for arch, models in families.items():
        ck = Checkpoint(str(models["base"]))
        layout = ck.layout
        assert not layout.inferred and layout.architecture == arch
        assert layout.num_layers == 2
        in_layers = {
            n for n, t in ck.tensors.items()
            if layout.layer_of(n) is not None and len(t.shape) == 2 and n.endswith(".weight")
        }  # fmt: skip
        assert in_layers == set(layout.projections), arch
        groups = {p.group for p in layout.projections.values()}
        assert {"attn", "mlp"} <= groups, arch
        assert layout.tied == (not any(n == layout.head for n in ck.tensors)), arch
        fp = fingerprint_checkpoint(ck)
        assert fp.architecture == arch and "declared" in fp.layout


def _reference_column_cosine(path: Path, other: Path) -> dict[str, float]:
    """The paper's metric from the models' own modules: nn.Linear weights are [out, in],
    GPT-2's Conv1D weights [in, out] (transformers' own convention, not the catalog's)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    a, b = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (path, other))
    mods_b = dict(b.named_modules())
    out = {}
    for name, mod in a.named_modules():
        if isinstance(mod, torch.nn.Linear | Conv1D) and name in mods_b:
            wa, wb = mod.weight.detach(), mods_b[name].weight.detach()
            if isinstance(mod, Conv1D):
                wa, wb = wa.T, wb.T
            cos = torch.nn.functional.cosine_similarity(wa.double(), wb.double(), dim=0)
            out[f"{name}.weight"] = float(cos.mean())
    return out


def test_similarity_is_the_input_column_cosine_for_every_family(families):
    for arch, models in families.items():
        cks = {n: Checkpoint(str(p)) for n, p in models.items()}
        res = pairwise_similarity(cks)
        ref = _reference_column_cosine(models["base"], models["ft1"])
        per = res.per_tensor[("base", "ft1")]
        assert per and set(per) & set(ref), arch
        files = [load_file(models[n] / "model.safetensors") for n in ("base", "ft1")]
        for t, v in per.items():
            if t not in ref:  # MoE experts are fused in memory: [out, in] as stored
                a, b = (f[t].double() for f in files)
                ref[t] = float(torch.nn.functional.cosine_similarity(a, b, dim=0).mean())
            assert v == pytest.approx(ref[t], abs=1e-5), (arch, t)
        mean = sum(per.values()) / len(per)
        assert res.summary[("base", "ft1")]["sim_all"] == pytest.approx(mean, abs=1e-9)
        layout = cks["base"].layout
        assert set(per) == set(layout.select(("attn", "mlp"))), arch


def test_families_cluster_together_and_architectures_apart(families, tmp_path):
    models = {f"{arch}/{n}": p for arch, fam in families.items() for n, p in fam.items()}
    other = save_tiny(tmp_path / "llama-other", "LlamaForCausalLM", seed=999)
    models["LlamaForCausalLM/other"] = other
    archs = {n: fingerprint_checkpoint(str(p)).arch_signature for n, p in models.items()}
    sims: dict[tuple[str, str], float] = {}
    for sig in set(archs.values()):
        group = {n: Checkpoint(str(models[n])) for n in models if archs[n] == sig}
        sims |= {k: v["sim_all"] for k, v in pairwise_similarity(group).summary.items()}
    clusters = cluster_models(archs, lambda a, b: sims[tuple(sorted((a, b)))], 0.9)
    found = sorted(sorted(c.members) for c in clusters)
    expected = sorted(
        [sorted(f"{arch}/{n}" for n in ("base", "ft1", "ft2")) for arch in families]
        + [["LlamaForCausalLM/other"]]
    )
    assert found == expected


def _ties_reference(base, models, density):
    taus = [m - base for m in models]
    trimmed = []
    for t in taus:
        flat = t.flatten()
        k = max(1, int(density * flat.numel()))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat.abs(), k).indices] = True
        trimmed.append(torch.where(keep, flat, 0).view_as(t))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)  # a zero sum elects + (mergekit's rule)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(0)
    count = agree.sum(0).clamp_min(1)
    return base + total / count


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merges_of_every_family_match_a_plain_computation_and_load(families, tmp_path, method):
    from transformers import AutoModelForCausalLM

    for arch, fam in families.items():
        base = fam["base"]
        inputs = [ModelInput(str(fam["ft1"])), ModelInput(str(fam["ft2"]))]
        spec = MergeSpec(
            method,
            inputs,
            base=str(base) if method == "ties" else None,
            params={"density": 0.5} if method == "ties" else {},
        )
        out = tmp_path / method / arch
        merge_to_directory(spec, out)
        merged = load_file(out / "model.safetensors")
        sds = [load_file(fam[n] / "model.safetensors") for n in ("base", "ft1", "ft2")]
        for name, t in merged.items():
            if not t.is_floating_point():
                continue
            if method == "linear":
                want = (sds[1][name] + sds[2][name]) / 2
            else:
                want = _ties_reference(sds[0][name], [sds[1][name], sds[2][name]], 0.5)
            assert torch.allclose(t, want, atol=1e-6), (arch, name)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits = model(torch.tensor([[3, 5, 7]])).logits
        assert torch.isfinite(logits).all(), arch
        layout = Checkpoint(str(base)).layout
        if layout.tied:  # no head written, and the loaded head is the embedding
            assert layout.embeddings[0] in merged and len(merged) == len(sds[0])
            emb, head = model.get_input_embeddings(), model.get_output_embeddings()
            assert head.weight.data_ptr() == emb.weight.data_ptr(), arch


MOE = [a.name for a in ARCHITECTURES if a.moe_builder]


@pytest.mark.parametrize("arch", MOE)
def test_ffn_moe_of_each_capable_family_loads_runs_and_reduces_to_its_base(
    families, tmp_path, arch
):
    """Experts that are all the base make the base again (dense layers or not); fine-tunes
    make a model that transformers loads and runs."""
    from transformers import AutoModelForCausalLM

    from model_glue.architectures import MOE_BUILDERS
    from model_glue.mixture.ffn_moe import build_ffn_moe
    from model_glue.mixture.routers import RouterInit

    fam = families[arch]
    ids = torch.tensor([[1, 4, 9, 16, 25], [2, 3, 5, 7, 11]])
    dense = AutoModelForCausalLM.from_pretrained(fam["base"]).eval()
    for k in (0, 1):
        out = build_ffn_moe(
            fam["base"],
            [fam["base"]] * 3,
            tmp_path / f"same-{k}",
            router=RouterInit(method="random"),
            dense_layers=k,
            expert_names=["a", "b", "c"],
        )
        moe = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(moe).__name__ == MOE_BUILDERS[ARCHITECTURES[NAMES.index(arch)].moe_builder]
        with torch.no_grad():
            assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5)
    out = build_ffn_moe(
        fam["base"],
        [fam["ft1"], fam["ft2"]],
        tmp_path / "mix",
        router=RouterInit(method="random"),
        expert_names=["ft1", "ft2"],
    )
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert logits.shape == (2, 5, 64) and torch.isfinite(logits).all()


def test_ffn_moe_of_another_family_names_the_supported_ones(families, tmp_path):
    from model_glue.mixture import MixtureError
    from model_glue.mixture.ffn_moe import build_ffn_moe

    fam = families["GPT2LMHeadModel"]
    with pytest.raises(MixtureError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        build_ffn_moe(fam["base"], [fam["ft1"], fam["ft2"]], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _rename(src: Path, dst: Path, arch: str, model_type: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(architectures=[arch], model_type=model_type)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_an_unknown_architecture_gets_an_inferred_layout(families, tmp_path):
    """GPT-2's tensors under a name the catalog lacks: layers, Conv1D layout and groups are
    inferred from names and shapes, and similarity equals the declared layout's."""
    fam = families["GPT2LMHeadModel"]
    renamed = {n: _rename(p, tmp_path / n, "MyGPTForCausalLM", "mygpt") for n, p in fam.items()}
    ck = Checkpoint(str(renamed["base"]))
    layout = ck.layout
    assert layout.inferred and layout.transposed and layout.num_layers == 2
    assert layout.describe() == (
        "layout of MyGPTForCausalLM inferred: 2 layers, 4 projections each, Conv1D [in, out], "
        "tied head"
    )
    declared = Checkpoint(str(fam["base"])).layout
    assert {n: p.group for n, p in layout.projections.items()} == {
        n: p.group for n, p in declared.projections.items()
    }
    inferred = pairwise_similarity({n: Checkpoint(str(p)) for n, p in renamed.items()})
    known = pairwise_similarity({n: Checkpoint(str(p)) for n, p in fam.items()})
    for pair, row in known.summary.items():
        assert inferred.summary[pair]["sim_all"] == pytest.approx(row["sim_all"], abs=1e-9)
    fp = fingerprint_checkpoint(str(renamed["base"]))
    assert fp.layout_inferred and "inferred" in fp.layout
    # a merge of the unknown architecture works tensor by tensor
    spec = MergeSpec("linear", [ModelInput(str(renamed["ft1"])), ModelInput(str(renamed["ft2"]))])
    merge_to_directory(spec, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_inferred_layout_of_other_shapes():
    """A standard-layout model the catalog lacks (Llama names, renamed), fused expert
    names, and a model without numbered layers (no projections: similarity will say so)."""
    per = {"attn.wq": (16, 16), "attn.wo": (16, 16), "ff.w_in": (40, 16), "ff.w_out": (16, 40)}
    shapes = {f"net.blocks.{i}.{p}.weight": s for i in range(3) for p, s in per.items()}
    shapes |= {f"net.blocks.{i}.norm.weight": (16,) for i in range(3)}
    shapes |= {"net.tok.weight": (50, 16), "out.weight": (50, 16)}
    cfg = {"architectures": ["FooForCausalLM"], "hidden_size": 16, "vocab_size": 50}
    layout = resolve_layout(cfg, shapes)
    assert layout.prefix == "net.blocks" and layout.num_layers == 3 and not layout.transposed
    assert {p.group for n, p in layout.projections.items() if ".attn." in n} == {"attn"}
    assert {p.group for n, p in layout.projections.items() if ".ff." in n} == {"mlp"}
    assert layout.embeddings == ("net.tok.weight",) and layout.head == "out.weight"
    flat = resolve_layout({"architectures": ["BarLM"]}, {"w": (4, 4), "b": (4,)})
    assert flat.num_layers == 0 and flat.select(("attn", "mlp")) == []


def test_a_checkpoint_that_contradicts_its_architecture_is_refused_naming_the_tensor(
    families, tmp_path
):
    src = families["Phi3ForCausalLM"]["base"]
    state = load_file(src / "model.safetensors")
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    dropped = "model.layers.1.mlp.gate_up_proj.weight"
    save_file({k: v for k, v in state.items() if k != dropped}, missing / "model.safetensors")
    with pytest.raises(
        LayoutError, match=r"model\.layers\.1\.mlp\.gate_up_proj\.weight is missing"
    ):
        fingerprint_checkpoint(str(missing))
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    bonus = "model.layers.0.mlp.bonus_proj.weight"
    save_file({**state, bonus: torch.zeros(8, 32)}, extra / "model.safetensors")
    with pytest.raises(
        LayoutError, match=r"model\.layers\.0\.mlp\.bonus_proj\.weight.*not a projection"
    ):
        fingerprint_checkpoint(str(extra))
    fewer = tmp_path / "fewer"
    shutil.copytree(src, fewer)
    cfg = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(LayoutError, match="declares 3 layers, the tensors hold 2"):
        fingerprint_checkpoint(str(fewer))


def test_gpt2_saved_without_its_transformer_prefix_resolves(families, tmp_path):
    """Hub GPT-2 checkpoints (openai-community/gpt2) store ``h.0.attn...`` and ``wte``."""
    src = families["GPT2LMHeadModel"]["base"]
    state = load_file(src / "model.safetensors")
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    save_file(
        {k.removeprefix("transformer."): v for k, v in state.items()}, bare / "model.safetensors"
    )
    layout = Checkpoint(str(bare)).layout
    assert layout.prefix == "h" and layout.num_layers == 2 and layout.transposed
    assert layout.embeddings == ("wte.weight", "wpe.weight") and layout.layer_filter(1) == "h.1."


@pytest.mark.parametrize(
    ("variant", "arch", "supported"),
    [
        ("ffn_moe", "GPT2LMHeadModel", "LlamaForCausalLM -> MixtralForCausalLM"),
        ("hybrid", "GPTNeoXForCausalLM", "Qwen3ForCausalLM -> Qwen3MoeForCausalLM"),
        ("block_level", "Qwen2ForCausalLM", "supported: LlamaForCausalLM"),
    ],
)
def test_a_weight_level_mixture_of_another_family_is_a_config_error(
    families, tmp_path, variant, arch, supported
):
    """Before any stage runs: ``glue run`` exits 2 with one line naming the config, the
    key, the zoo model and the families that are supported."""
    import yaml

    from tests.factories import glue_run_as_user

    config = tmp_path / "glue.yaml"
    zoo = [{"name": n, "path": str(p)} for n, p in families[arch].items()]
    config.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "zoo": zoo,
                "evaluation": {"tasks": ["demo_add"]},
                "mixture": {"variant": variant, "router": "random"}
                | ({"hybrid_k": 1} if variant == "hybrid" else {}),
            }
        )
    )
    proc = glue_run_as_user(config, cwd=tmp_path, home=tmp_path / "home")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert f"mixture.variant: {variant}: zoo model 'base'" in lines[0]
    assert arch in lines[0] and supported in lines[0]
    assert not (tmp_path / "home" / "store").exists()  # nothing ran
