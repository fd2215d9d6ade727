"""Discovery: the hub's fine-tunes of a base that a run added to its zoo.

The query itself is asked by the step (``flows.zoo``), every run: the hub changes while
the config does not. This stage records the answer, so each flow run's list is in the
lineage database (``discoveries``), and ``glue plan`` compares it with the last one.
"""

from __future__ import annotations

from storage import ArtifactStore, Details, Lineage
from tasks.stage import Call, Component, Stage

DISCOVERY = Component("discovery", "1")


def _discover(store: ArtifactStore, key: str, query: dict, repos: list[str]) -> dict:
    """``repos``: what the hub listed for ``query``, in its order."""
    return {"query": query, "repos": list(repos)}


def _lineage(call: Call, r: dict) -> Lineage:
    base = call.params["query"]["base_model"]
    rows = [
        {"base_model": base, "repo": repo, "rank": i, "query": call.params["query"]}
        for i, repo in enumerate(r["repos"])
    ]
    return Lineage(details=[Details("discoveries", rows)])


STAGE = Stage(
    name="discover",
    compute=_discover,
    uses=DISCOVERY,
    lineage=_lineage,
    describe=lambda r: [f"{len(r['repos'])} repos: {', '.join(r['repos'][:5])}"],
    pending=lambda c: {"repos": c.params["repos"]},
)

discover_models = STAGE.task(retries=0)
