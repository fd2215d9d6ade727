"""Stage functions without a flow: keys, store reuse, incremental similarity."""

from __future__ import annotations

import re

import pytest

from model_glue.checkpoint import Checkpoint
from storage import ArtifactStore
from tasks.cluster import cluster_zoo
from tasks.fingerprint import fingerprint_model
from tasks.merge import merge_cluster
from tasks.similarity import EXACT_MARGIN, compute_similarity
from tasks.stage import REUSED


@pytest.fixture
def zoo(tiny_llama):
    a = tiny_llama("a", seed=0)
    return {
        "a": a,
        "a1": tiny_llama("a1", seed=1, base=a, noise=0.2),
        "a2": tiny_llama("a2", seed=2, base=a, noise=0.2),
        "b": tiny_llama("b", seed=3),
    }


def _fp(store_url, zoo, name):
    return fingerprint_model.fn(store_url=store_url, name=name, uri=str(zoo[name]))


@pytest.fixture
def counted_reads(monkeypatch):
    """Tensor reads per checkpoint: fingerprinting's hashing reads and every other read."""
    import model_glue.fingerprint as fingerprint

    reads: dict[str, int] = {}
    tensor, digest = Checkpoint.tensor, fingerprint._tensor_digest

    def counted(self, name):
        reads[self.uri] = reads.get(self.uri, 0) + 1
        return tensor(self, name)

    def hashed(ckpt, name, *args):
        reads[ckpt.uri] = reads.get(ckpt.uri, 0) + 1
        return digest(ckpt, name, *args)

    monkeypatch.setattr(Checkpoint, "tensor", counted)
    monkeypatch.setattr(fingerprint, "_tensor_digest", hashed)
    return reads


def test_adding_a_model_reads_only_the_newcomer(zoo, tmp_path, counted_reads):
    """Similarity comes from the sketches fingerprinting made: a zoo refresh that adds a
    model reads that model once (to fingerprint it) and no other checkpoint."""
    store_url = str(tmp_path / "store")
    reads = counted_reads
    recs = {n: _fp(store_url, zoo, n) for n in ("a", "a1", "a2")}
    every_tensor = len(Checkpoint(str(zoo["a"])).tensors)
    assert reads == {str(zoo[n]): every_tensor for n in ("a", "a1", "a2")}
    reads.clear()
    first = compute_similarity.fn(
        store_url=store_url, models=list(recs.values()), groups=["attn", "mlp"], threshold=0.5
    )
    assert (first["n_pairs"], first["sketched_pairs"], first["exact_pairs"]) == (3, 3, 0)
    assert reads == {}
    recs |= {n: _fp(store_url, zoo, n) for n in zoo}  # the refresh: b is new
    assert reads == {str(zoo["b"]): every_tensor}
    reads.clear()
    second = compute_similarity.fn(
        store_url=store_url, models=[recs[n] for n in zoo], groups=["attn", "mlp"], threshold=0.5
    )
    assert (second["n_pairs"], second["sketched_pairs"]) == (6, 6)
    assert reads == {}  # every pair came from sketches
    by_pair = {(r["name_a"], r["name_b"], r["metric"]): r for r in second["pairs"]}
    assert (
        by_pair[("a", "a1", "sim_all")]["value"]
        > 0.9
        > abs(by_pair[("a", "b", "sim_all")]["value"])
    )
    assert {r["via"] for r in second["pairs"]} == {"sketch"}


def test_a_pair_near_the_threshold_is_computed_exactly_and_only_it(zoo, tmp_path, counted_reads):
    store_url = str(tmp_path / "store")
    recs = {n: _fp(store_url, zoo, n) for n in zoo}
    models = list(recs.values())
    sketched = compute_similarity.fn(
        store_url=store_url, models=models, groups=["attn", "mlp"], threshold=0.5
    )
    value = {
        (r["name_a"], r["name_b"]): r["value"]
        for r in sketched["pairs"]
        if r["metric"] == "sim_all"
    }
    threshold = value[("a", "a1")] + 0.005
    expected = {p for p, v in value.items() if abs(v - threshold) <= EXACT_MARGIN}
    assert ("a", "a1") in expected and ("a", "b") not in expected
    counted_reads.clear()
    near = compute_similarity.fn(
        store_url=store_url, models=models, groups=["attn", "mlp"], threshold=threshold
    )
    assert near["exact_pairs"] == len(expected)
    assert set(counted_reads) == {str(zoo[n]) for p in expected for n in p}  # only those
    via = {(r["name_a"], r["name_b"]): r["via"] for r in near["pairs"] if r["metric"] == "sim_all"}
    assert via == {p: "exact" if p in expected else "sketch" for p in value}


def test_exact_similarity_reads_each_model_once_per_new_pair_set(zoo, tmp_path, counted_reads):
    """similarity.exact: true, the paper's numbers to the last digit: one streaming pass
    over the models of the new pairs, every tensor of each read once."""
    store_url = str(tmp_path / "store")
    recs = {n: _fp(store_url, zoo, n) for n in zoo}
    reads = counted_reads
    reads.clear()
    first = compute_similarity.fn(
        store_url=store_url,
        models=[recs[n] for n in ("a", "a1", "a2")],
        groups=["attn", "mlp"],
        exact=True,
    )
    assert (first["exact_pairs"], first["reused_exact_pairs"]) == (3, 0)
    n_tensors = 14  # 2 layers x 7 projections
    assert reads == {str(zoo[n]): n_tensors for n in ("a", "a1", "a2")}
    reads.clear()
    second = compute_similarity.fn(
        store_url=store_url, models=[recs[n] for n in zoo], groups=["attn", "mlp"], exact=True
    )
    assert (second["exact_pairs"], second["reused_exact_pairs"]) == (3, 3)
    # one pass: every tensor of the new model and of its partners read exactly once
    assert reads == {str(zoo[n]): n_tensors for n in zoo}
    reads.clear()
    again = compute_similarity.fn(
        store_url=store_url,
        models=[recs[n] for n in reversed(list(zoo))],
        groups=["attn", "mlp"],
        exact=True,
    )
    assert reads == {} and again["pairs"] == second["pairs"]
    assert {r["via"] for r in second["pairs"]} == {"exact"}
    assert len(second["tensor_pairs"]) == 6 * n_tensors


def test_clusters_and_merge_are_keyed_on_content_not_names_or_order(zoo, tmp_path):
    store_url = str(tmp_path / "store")
    recs = {n: _fp(store_url, zoo, n) for n in zoo}
    sim = compute_similarity.fn(
        store_url=store_url, models=list(recs.values()), groups=["attn", "mlp"]
    )
    models = list(recs.values())
    c1 = cluster_zoo.fn(
        store_url=store_url,
        models=models,
        similarity_keys=[sim["key"]],
        metric="sim_all",
        threshold=0.8,
    )
    c2 = cluster_zoo.fn(
        store_url=store_url,
        models=models[::-1],
        similarity_keys=[sim["key"]],
        metric="sim_all",
        threshold=0.8,
    )
    assert c2.pop(REUSED) is True  # same key: the second call found the first's record
    assert c1 == c2
    assert [[m["name"] for m in c["members"]] for c in c1["clusters"]] == [["a", "a1", "a2"], ["b"]]
    members = [recs[n] for n in ("a", "a1", "a2")]
    m1 = merge_cluster.fn(
        store_url=store_url, label="x", members=members, method="linear", params={}
    )
    m2 = merge_cluster.fn(
        store_url=store_url, label="x", members=members[::-1], method="linear", params={}
    )
    assert m1["artifact_id"] == m2["artifact_id"]
    store = ArtifactStore(store_url)
    assert store.exists("model", m1["artifact_id"], verify="hash")
    assert len(store.list("model")) == 1
    # the merged weights are the uniform average of the members
    import torch

    merged = Checkpoint(str(store.local_path("model", m1["artifact_id"])))
    t = "model.layers.1.mlp.up_proj.weight"
    expected = sum(Checkpoint(str(zoo[n])).tensor(t) for n in ("a", "a1", "a2")) / 3
    assert torch.allclose(merged.tensor(t), expected, atol=1e-6)
    # another parameter is another artifact, beside the first
    m3 = merge_cluster.fn(
        store_url=store_url,
        label="x",
        members=members,
        method="task_arithmetic",
        params={"lambda": 0.5},
        base=recs["a"],
    )
    assert m3["artifact_id"] != m1["artifact_id"] and len(store.list("model")) == 2


def test_bad_merge_parameter_names_the_key(zoo, tmp_path):
    from model_glue.merge import MergeConfigError

    store_url = str(tmp_path / "store")
    members = [_fp(store_url, zoo, n) for n in ("a", "a1")]
    # bad input ends the task in a handled Failed state: one line, the error's class first
    state = merge_cluster.fn(
        store_url=store_url,
        label="x",
        members=members,
        method="ties",
        params={"densty": 0.5},
        base=members[0],
    )
    assert state.is_failed()
    assert re.match(rf"{MergeConfigError.__name__}: .*(densty|density)", state.message)
    assert "\n" not in state.message
    assert ArtifactStore(store_url).list("model") == []


def test_merging_another_architecture_names_the_model(zoo, tiny_llama, tmp_path):
    from model_glue.merge import MergeInputError

    store_url = str(tmp_path / "store")
    wide = tiny_llama("wide", seed=9, hidden=32)
    members = [
        _fp(store_url, zoo, "a"),
        fingerprint_model.fn(store_url=store_url, name="wide", uri=str(wide)),
    ]
    assert members[0]["arch_signature"] != members[1]["arch_signature"]
    state = merge_cluster.fn(
        store_url=store_url, label="x", members=members, method="linear", params={}
    )
    assert state.is_failed()
    assert re.match(rf"{MergeInputError.__name__}: .*wide", state.message)
    assert ArtifactStore(store_url).list("model") == []


def test_a_large_group_lists_only_the_pairs_near_or_above_the_threshold(zoo, tmp_path, monkeypatch):
    """Every value is in the group's matrices; past ALL_ROWS_UP_TO pairs the record and
    lineage list the pairs that can matter to clustering, and clustering reads the
    matrices (the clusters do not change)."""
    import tasks.similarity as similarity

    store_url = str(tmp_path / "store")
    recs = [_fp(store_url, zoo, n) for n in zoo]
    full = compute_similarity.fn(
        store_url=store_url, models=recs, groups=["attn", "mlp"], threshold=0.5
    )
    monkeypatch.setattr(similarity, "ALL_ROWS_UP_TO", 2)
    few = compute_similarity.fn(
        store_url=str(tmp_path / "store2"),
        models=[_fp(str(tmp_path / "store2"), zoo, n) for n in zoo],
        groups=["attn", "mlp"],
        threshold=0.5,
    )
    listed = {(r["name_a"], r["name_b"]) for r in few["pairs"]}
    assert listed == {("a", "a1"), ("a", "a2"), ("a1", "a2")}  # b joins nobody
    assert len({(r["name_a"], r["name_b"]) for r in full["pairs"]}) == 6
    for store, rec in ((store_url, full), (str(tmp_path / "store2"), few)):
        c = cluster_zoo.fn(
            store_url=store,
            models=recs,
            similarity_keys=[rec["key"]],
            metric="sim_all",
            threshold=0.5,
        )
        assert [[m["name"] for m in x["members"]] for x in c["clusters"]] == [
            ["a", "a1", "a2"],
            ["b"],
        ]
