import itertools
import random

import pytest
import torch
from safetensors.torch import load_file

from model_glue.architectures import infer_layout
from model_glue.checkpoint import Checkpoint
from model_glue.clustering import cluster_models
from model_glue.similarity import column_cosine, pairwise_similarity, select_tensors


def _hand_column_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    vals = []
    for j in range(a.shape[1]):
        x, y = a[:, j].double(), b[:, j].double()
        vals.append(float(x @ y / (x.norm() * y.norm())))
    return sum(vals) / len(vals)


def test_column_cosine_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert column_cosine(a, b) == pytest.approx(_hand_column_cosine(a, b), abs=1e-6)
    assert column_cosine(a, a) == pytest.approx(1.0, abs=1e-6)
    assert column_cosine(a, -a) == pytest.approx(-1.0, abs=1e-6)
    # scaling a column of one model does not change the metric (cosine is scale-free)
    c = a.clone()
    c[:, 2] *= 3
    assert column_cosine(a, c) == pytest.approx(1.0, abs=1e-6)


def test_tensor_selection_is_the_papers_projection_set():
    names = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ]
    shapes = {n: (4,) if "norm" in n else (4, 4) for n in names}
    layout = infer_layout({"architectures": ["SomethingForCausalLM"]}, shapes)
    assert select_tensors(layout) == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ]
    assert layout.group_of("lm_head.weight") == "embed"
    with pytest.raises(ValueError, match="unknown tensor group"):
        select_tensors(layout, ["attention"])


def test_pairwise_similarity_against_hand_computation(tiny_llama):
    base = tiny_llama("base", seed=0)
    ft = tiny_llama("ft", seed=1, base=base, noise=0.3)
    other = tiny_llama("other", seed=2)
    ckpts = {n: Checkpoint(str(p)) for n, p in [("base", base), ("ft", ft), ("other", other)]}
    res = pairwise_similarity(ckpts, base=Checkpoint(str(base)))
    sds = {
        n: load_file(p / "model.safetensors")
        for n, p in [("base", base), ("ft", ft), ("other", other)]
    }
    names = select_tensors(Checkpoint(str(base)).layout)
    assert len(names) == 2 * 7
    for a, b in [("base", "ft"), ("base", "other"), ("ft", "other")]:
        per = [_hand_column_cosine(sds[a][t], sds[b][t]) for t in names]
        attn = [v for t, v in zip(names, per, strict=True) if "self_attn" in t]
        mlp = [v for t, v in zip(names, per, strict=True) if ".mlp." in t]
        s = res.summary[(a, b)]
        assert s["sim_all"] == pytest.approx(sum(per) / len(per), abs=1e-6)
        assert s["sim_attn"] == pytest.approx(sum(attn) / len(attn), abs=1e-6)
        assert s["sim_mlp"] == pytest.approx(sum(mlp) / len(mlp), abs=1e-6)
        flat_a = torch.cat([sds[a][t].flatten() for t in names]).double()
        flat_b = torch.cat([sds[b][t].flatten() for t in names]).double()
        assert s["flat_cosine"] == pytest.approx(
            float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm())), abs=1e-6
        )
        assert res.per_tensor[(a, b)][names[0]] == pytest.approx(per[0], abs=1e-6)
    # a fine-tune is far closer to its base than an unrelated init
    assert res.value("base", "ft") > 0.9 > 0.2 > abs(res.value("base", "other"))
    # task vectors: base's own task vector is zero, so its cosine is 0 by convention
    assert res.summary[("ft", "other")]["task_vector_cosine"] < 0.5


def test_only_requested_pairs_read_only_involved_models(tiny_llama, monkeypatch):
    paths = {n: tiny_llama(n, seed=i) for i, n in enumerate("abcd")}
    ckpts = {n: Checkpoint(str(p)) for n, p in paths.items()}
    reads: dict[str, int] = {n: 0 for n in paths}
    for n, ck in ckpts.items():
        orig = ck.tensor

        def counted(name, _orig=orig, _n=n):
            reads[_n] += 1
            return _orig(name)

        monkeypatch.setattr(ck, "tensor", counted)
    full = pairwise_similarity({n: Checkpoint(str(p)) for n, p in paths.items()})
    res = pairwise_similarity(ckpts, pairs=[("d", "a"), ("b", "d")])
    assert set(res.summary) == {("a", "d"), ("b", "d")}
    assert reads["c"] == 0 and reads["d"] == reads["a"] == reads["b"] == 14
    # float32 Gram over a different batch of models: equal to float32 rounding (values near
    # 0 make a relative tolerance meaningless)
    assert res.summary[("a", "d")] == pytest.approx(full.summary[("a", "d")], abs=1e-6)


def test_clustering_is_order_independent_and_complete_linkage():
    # three families by construction; a chain x~y~z where x and z are not similar
    sims = {
        ("a1", "a2"): 0.97,
        ("a1", "a3"): 0.96,
        ("a2", "a3"): 0.98,
        ("b1", "b2"): 0.99,
        ("x", "y"): 0.96,
        ("y", "z"): 0.96,
        ("x", "z"): 0.90,
    }
    arch = {k: "A" for k in ["a1", "a2", "a3", "b1", "b2", "x", "y", "z"]} | {"other": "B"}

    def sim(a, b):
        return sims.get((a, b), sims.get((b, a), 0.1))

    expected = None
    keys = list(arch)
    for seed in range(20):
        random.Random(seed).shuffle(keys)
        clusters = cluster_models({k: arch[k] for k in keys}, sim, threshold=0.95)
        got = sorted(c.members for c in clusters)
        expected = expected or got
        assert got == expected
    assert ("a1", "a2", "a3") in expected and ("b1", "b2") in expected and ("other",) in expected
    # complete linkage never puts x and z together; y joins one of them deterministically
    xyz = [c for c in expected if set(c) & {"x", "y", "z"}]
    assert sorted(map(len, xyz)) == [1, 2]
    mins = {c.members: c.min_similarity for c in cluster_models(arch, sim, 0.95)}
    assert mins[("a1", "a2", "a3")] == pytest.approx(0.96) and mins[("other",)] is None


def test_clustering_never_mixes_architectures():
    arch = {"a": "A", "b": "B"}
    clusters = cluster_models(arch, lambda a, b: 1.0, threshold=0.5)
    assert sorted(c.members for c in clusters) == [("a",), ("b",)]
    with pytest.raises(ValueError, match="threshold"):
        cluster_models(arch, lambda a, b: 1.0, threshold=1.5)


def test_tiny_families_cluster_apart(tiny_llama):
    a = tiny_llama("a", seed=0)
    fts = [tiny_llama(f"a{i}", seed=10 + i, base=a, noise=0.2) for i in range(3)]
    b = tiny_llama("b", seed=1)
    bft = tiny_llama("b1", seed=20, base=b, noise=0.2)
    paths = {"a": a, "b": b, "b1": bft} | {f"a{i}": p for i, p in enumerate(fts)}
    res = pairwise_similarity({n: Checkpoint(str(p)) for n, p in paths.items()})
    clusters = cluster_models(dict.fromkeys(paths, "llama"), res.value, threshold=0.8)
    assert sorted(c.members for c in clusters) == [("a", "a0", "a1", "a2"), ("b", "b1")]
    for c in clusters:
        assert min(
            res.value(x, y) for x, y in itertools.combinations(c.members, 2)
        ) == pytest.approx(c.min_similarity)
