"""A stage that fails for one group leaves that group's models as they are."""

from __future__ import annotations

from rich.console import Console

from flows import steps
from flows._recorder import Outcome
from tasks.refs import ModelRef


def _ref(name: str, arch: str = "a") -> ModelRef:
    return ModelRef(name, f"/zoo/{name}", f"fp-{name}", f"fp-{name}", arch_signature=arch)


class _Rec:
    """A recorder whose calls all fail (as a failed similarity or clustering call does)."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self.console = Console(file=open("/dev/null", "w"))  # noqa: SIM115

    def run(self, c) -> Outcome:
        return Outcome(c.label, "failed", 0.0, None, "SimilarityError: no tensors")

    def say(self, line: str, style: str | None = None) -> None:
        self.said.append(line)


def test_a_failed_similarity_group_stays_unclustered_and_the_rest_is_clustered(monkeypatch):
    from model_glue.config import RunConfig

    cfg = RunConfig.model_validate(
        {
            "name": "t",
            "zoo": [{"name": n, "path": f"/zoo/{n}"} for n in "abcd"],
            "evaluation": {"tasks": ["demo_add"]},
        }
    )
    models = [_ref("a", "x"), _ref("b", "x"), _ref("c", "y"), _ref("d", "y")]
    rec = _Rec()
    sims = steps.similarity(models, cfg, rec)  # every call fails here
    assert sims.keys == [] and [m.name for m in sims.failed] == ["a", "b", "c", "d"]
    assert sum("stay unclustered" in line for line in rec.said) == 2
    clusters = steps.cluster(models, sims, cfg, rec)
    assert [[m.name for m in c] for c in clusters] == [["a"], ["b"], ["c"], ["d"]]
    # one group failed, the other measured: the failed group's models are clusters of one
    ok = steps.Similarities(["key-x"], [models[2], models[3]])

    class _Clusters(_Rec):
        def run(self, c) -> Outcome:
            assert {m["name"] for m in c.params["models"]} == {"a", "b"}
            record = {"clusters": [{"members": [{"fingerprint": "fp-a"}, {"fingerprint": "fp-b"}]}]}
            return Outcome(c.label, "completed", 0.0, record)

    clusters = steps.cluster(models, ok, cfg, _Clusters())
    assert [[m.name for m in c] for c in clusters] == [["a", "b"], ["c"], ["d"]]


def test_a_cluster_whose_search_or_merge_failed_offers_each_member():
    a, b, c, d, e = (_ref(n) for n in "abcde")
    clusters = [[a, b], [c, d], [e]]
    merged_ab = _ref("merge-a")
    searched = [steps.Cluster(0, "a", [a, b]), steps.Cluster(1, "c", [c, d])]
    # cluster 0 merged; cluster 1's merge failed (absent); cluster 2 a singleton
    experts = steps.experts_of(clusters, searched, {0: merged_ab})
    assert [m.name for m in experts] == ["merge-a", "c", "d", "e"]
    # cluster 1's search failed (not among the searched clusters): the same
    experts = steps.experts_of(clusters, searched[:1], {0: merged_ab})
    assert [m.name for m in experts] == ["merge-a", "c", "d", "e"]
