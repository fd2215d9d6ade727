"""Stages 4a and 6: which experts enter the mixture, and which model the run hands over.

Both read only proxy evaluations (``evaluate`` with ``split: proxy``), never a document the
leaderboard reports:

- ``select``: greedy expert selection for the model-level mixture, among every cluster's
  model and every zoo model
  (:mod:`model_glue.mixture.selection`); its record keeps the proxy labels (each
  candidate's value on each proxy document), which a ``linear`` router is fitted on.
- ``final``: the best of the zoo models, the merged models and the mixture by proxy mean;
  ties go to the simpler model (zoo, then merged, then mixture), so the run's output is
  never below the best single model on the proxy split.
"""

from __future__ import annotations

from collections.abc import Mapping

from model_glue.evaluate import chosen_metric
from storage import Artifact, ArtifactStore, Details, Lineage
from tasks.stage import RECORD_KIND, Call, Stage
from tasks.versions import SELECTION

KIND_ORDER = {"model": 0, "merged": 1, "mixture": 2}


def proxy_mean(record: dict, metric: str | Mapping[str, str] | None) -> float:
    """Mean over tasks of one metric of a proxy evaluation record."""
    per_task: dict[str, dict[str, float]] = {}
    for sc in record["scores"]:
        per_task.setdefault(sc["task"], {})[sc["metric"]] = sc["value"]
    values = [
        v[chosen_metric(t, sorted(v), metric, "select on")] for t, v in sorted(per_task.items())
    ]
    return sum(values) / len(values)


def proxy_labels(records: list[dict], metric: str | Mapping[str, str] | None) -> dict:
    """Documents x candidates: each candidate's value on each proxy document, with the
    documents' tasks, ids and contexts (the text a router reads)."""
    rows = [{(s["task"], s["doc_id"]): s for s in r["samples"]} for r in records]
    docs = sorted(rows[0])
    missing = [i for i, r in enumerate(rows) if set(r) != set(docs)]
    if missing:
        raise ValueError("expert selection: candidates were scored on different proxy documents")
    correct = []
    for d in docs:
        available = sorted(rows[0][d]["values"])
        m = chosen_metric(d[0], available, metric, "select on")
        correct.append([float(r[d]["values"][m]) for r in rows])
    return {
        "tasks": [d[0] for d in docs],
        "doc_ids": [d[1] for d in docs],
        "contexts": [rows[0][d]["context"] for d in docs],
        "correct": correct,
    }


def router_features(
    backbone_uri: str,
    contexts: list[str],
    layer: int,
    pooling: str,
    device: str = "cpu",
    dtype: str = "float32",
):
    """The backbone's pooled hidden states entering ``layer`` for each context [N, H]
    (float32 on the CPU), the backbone run on ``device`` in ``dtype``."""
    from model_glue.mixture.hidden import layer_inputs
    from model_glue.mixture.loading import load_model, load_tokenizer

    model = load_model(backbone_uri, "router backbone", device=device, dtype=dtype)
    tokenizer = load_tokenizer(backbone_uri, "router backbone")
    return layer_inputs(model, tokenizer, contexts, [layer], pooling=pooling)[0]


def _select(
    store: ArtifactStore,
    key: str,
    candidates: list[dict],
    proxy_keys: dict[str, str],
    backbone: dict,
    layer: int,
    pooling: str,
    metric: str | dict[str, str] | None = None,
    max_experts: int | None = None,
    folds: int = 5,
    seed: int = 0,
    fixed: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """``candidates``: refs; ``proxy_keys``: each candidate's proxy evaluation record.
    ``fixed``: keep every candidate (no selection), for the proxy labels alone. The
    router features come from the backbone on ``device`` in ``dtype``."""
    import torch

    from model_glue.mixture.selection import (
        Selection,
        SelectionTrial,
        greedy_select,
        routed_score,
    )

    names = [c["name"] for c in candidates]
    records = [store.get_json(RECORD_KIND, proxy_keys[n]) for n in names]
    labels = proxy_labels(records, metric)
    features = router_features(backbone["uri"], labels["contexts"], layer, pooling, device, dtype)
    correct = torch.tensor(labels["correct"])
    if fixed:
        score = routed_score(features, correct, range(len(names)), folds=folds, seed=seed)
        result = Selection(names, score, [SelectionTrial(0, names, score, True, "fixed")])
    else:
        result = greedy_select(
            features, correct, names, max_experts=max_experts, folds=folds, seed=seed
        )
    return {
        "candidates": names,
        "selected": result.selected,
        "score": result.score,
        "means": {n: float(correct[:, i].mean()) for i, n in enumerate(names)},
        "oracle": float(correct.max(1).values.mean()),
        "backbone": backbone["name"],
        "layer": layer,
        "pooling": pooling,
        "trials": [
            {
                "trial": t.trial,
                "strategy": "expert-selection",
                "method": "model_level",
                "coefficients": t.experts,
                "proxy_score": t.score,
                "accepted": t.accepted,
                "reason": t.reason,
            }
            for t in result.trials
        ],
        **labels,
    }


def _select_lineage(call: Call, r: dict) -> Lineage:
    parents = tuple((c["artifact_id"], "candidate") for c in call.params["candidates"])
    return Lineage(
        artifacts=[
            Artifact(
                r["key"],
                kind="selection",
                name="expert-selection",
                stage="select",
                parents=parents,
                meta={"selected": r["selected"], "score": r["score"], "oracle": r["oracle"]},
            )
        ],
        details=[Details("trials", r["trials"], {"search_id": r["key"]})],
    )


def _select_describe(r: dict) -> list[str]:
    lines = [
        f"{'+' if t['accepted'] else ' '} {', '.join(t['coefficients']):<40} "
        f"{t['proxy_score']:.3f}  {t['reason']}"
        for t in r["trials"]
    ]
    return lines + [
        f"experts: {', '.join(r['selected'])} (proxy {r['score']:.3f}; every candidate's "
        f"best per document {r['oracle']:.3f})"
    ]


SELECT = Stage(
    name="select",
    compute=_select,
    uses=SELECTION,
    not_in_key={"device": "where it runs; the backbone's dtype is keyed"},
    key_parts=lambda a: {
        "candidates": sorted((c["name"], c["fingerprint"]) for c in a["candidates"]),
        "backbone": a["backbone"]["fingerprint"],
    },
    lineage=_select_lineage,
    describe=_select_describe,
    pending=lambda c: {"selected": [x["name"] for x in c.params["candidates"]]},
)

select_experts = SELECT.task()


def _final(
    store: ArtifactStore,
    key: str,
    candidates: list[dict],
    proxy_keys: dict[str, str],
    metric: str | dict[str, str] | None = None,
) -> dict:
    """The best candidate by proxy mean (ties: the simpler kind, then the name)."""
    ranking = sorted(
        (
            {
                "name": c["name"],
                "artifact_id": c["artifact_id"],
                "kind": c.get("kind", "model"),
                "proxy_mean": proxy_mean(
                    store.get_json(RECORD_KIND, proxy_keys[c["name"]]), metric
                ),
            }
            for c in candidates
        ),
        key=lambda r: (-r["proxy_mean"], KIND_ORDER.get(r["kind"], 3), r["name"]),
    )
    singles = [r for r in ranking if r["kind"] == "model"]
    return {"final": ranking[0], "best_single": singles[0] if singles else None, "ranking": ranking}


def _final_lineage(call: Call, r: dict) -> Lineage:
    final, single = r["final"], r["best_single"] or {}
    return Lineage(
        artifacts=[
            Artifact(
                r["key"],
                kind="selection",
                name="final-choice",
                stage="final",
                parents=tuple((c["artifact_id"], "candidate") for c in call.params["candidates"]),
                meta={"final": final["name"], "ranking": r["ranking"]},
            )
        ],
        details=[
            Details(
                "finals",
                [
                    {
                        "artifact_id": final["artifact_id"],
                        "name": final["name"],
                        "kind": final["kind"],
                        "proxy_mean": final["proxy_mean"],
                        "best_single_id": single.get("artifact_id"),
                        "best_single_proxy_mean": single.get("proxy_mean"),
                    }
                ],
                {"selection_id": r["key"]},
            )
        ],
    )


def _final_describe(r: dict) -> list[str]:
    return [f"{x['proxy_mean']:.3f}  {x['name']} ({x['kind']})" for x in r["ranking"]] + [
        f"final model: {r['final']['name']} (proxy {r['final']['proxy_mean']:.3f})"
    ]


FINAL = Stage(
    name="final",
    compute=_final,
    uses=SELECTION,
    key_parts=lambda a: {
        "candidates": sorted((c["name"], c["artifact_id"]) for c in a["candidates"]),
    },
    lineage=_final_lineage,
    describe=_final_describe,
)

choose_final = FINAL.task()
