"""Stage 3a: filter and search inside a cluster (Model-GLUE's selective merging).

Decides which members of a cluster to merge and with which coefficients, scoring every
trial on the proxy tasks (lm-eval with a ``limit``) on a model merged in memory: no
checkpoint is written per trial. Returns the accepted members with the engine parameters
that reproduce the best trial exactly, the rejected members with the reason, and every
trial for the lineage ``trials`` table.
"""

from __future__ import annotations

from storage import Artifact, ArtifactStore, Details, Lineage
from tasks.evaluate import task_files_hash
from tasks.stage import Call, Stage
from tasks.versions import SEARCH


def _filter(
    store: ArtifactStore,
    key: str,
    members: list[dict],
    base: dict | None,
    method: str,
    params: dict,
    settings: dict,
    proxy_tasks: list[str],
    proxy_limit: int | None,
    include_paths: list[str],
    proxy_metric: str | dict[str, str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int | str = 32,
    allow_code_execution: bool = False,
    anchor: str = "",
    tokenizer: str = "union",
) -> dict:
    """``settings``: the strategy and its own keys (``model_glue/search/strategies``).
    ``members`` never include ``base`` (it enters as the task-vector origin); ``anchor``
    names the cluster for people (not part of the key). ``tokenizer``: the run's
    ``merge.tokenizer``; each trial is scored with the vocabulary its merge is written
    with (members whose vocabularies differ are searched too), its members in the order
    ``tasks.merge.merge_spec`` lists them (by fingerprint)."""
    # imported here: the search stack (CMA-ES/scipy, transformers) costs seconds; cached reruns skip it
    from model_glue.evaluate import quiet_lm_eval
    from model_glue.search.engine_params import engine_model_params
    from model_glue.search.proxy import ProxyScorer
    from model_glue.search.strategies import STRATEGIES

    names = sorted(m["name"] for m in members)
    with quiet_lm_eval():
        scorer = ProxyScorer.from_checkpoints(
            {m["name"]: m["uri"] for m in members},
            proxy_tasks,
            limit=proxy_limit,
            base=base["uri"] if base else None,
            method_params={method: params} if params else None,
            metric=proxy_metric,
            include_paths=include_paths,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            allow_code_execution=allow_code_execution,
            tokenizer=tokenizer,
            order=[m["name"] for m in sorted(members, key=lambda m: m["fingerprint"])],
            base_name=base["name"] if base else "base",
        )
        strategy = STRATEGIES[settings["strategy"]]
        result = strategy.search(  # type: ignore[misc]
            names, scorer, method, strategy.settings.model_validate(settings)
        )
    engine_params = engine_model_params(result.spec, scorer.layout)
    merge_s = sum(c.merge_seconds for c in scorer.costs)
    eval_s = sum(c.eval_seconds for c in scorer.costs)
    return {
        "strategy": result.strategy,
        "method": method,
        "accepted": [{"name": n, "params": engine_params[n]} for n in result.accepted],
        "rejected": result.rejected,
        "best_score": result.best_score,
        "evaluations": result.evaluations,
        "trials": result.records(),
        "merge_seconds": merge_s,
        "eval_seconds": eval_s,
    }


def _lineage(call: Call, r: dict) -> Lineage:
    base = call.params.get("base")
    return Lineage(
        artifacts=[
            Artifact(
                r["key"],
                kind="search",
                name=f"search:{call.params.get('anchor') or call.label}",
                stage="filter",
                parents=tuple((m["fingerprint"], "member") for m in call.params["members"])
                + (((base["fingerprint"], "base"),) if base else ()),
                meta={"accepted": [a["name"] for a in r["accepted"]], "rejected": r["rejected"]},
            )
        ],
        details=[Details("trials", r["trials"], {"search_id": r["key"]})],
    )


def _describe(r: dict) -> list[str]:
    lines = [f"accepted {a['name']:<10} {a['params']}" for a in r["accepted"]]
    lines += [f"rejected {n:<10} {why}" for n, why in sorted(r["rejected"].items())]
    lines.append(
        f"best proxy score {r['best_score']:.3f} after {r['evaluations']} proxy evaluations "
        f"(merging {r['merge_seconds']:.1f} s, evaluating {r['eval_seconds']:.1f} s)"
    )
    return lines


STAGE = Stage(
    name="filter",
    compute=_filter,
    uses=SEARCH,
    not_in_key={
        "device": "where it runs; the dtype is keyed",
        "batch_size": "lm-eval's scores do not depend on it",
        "allow_code_execution": "a permission: a task that needs it fails without it",
        "anchor": "a label for people",
    },
    key_parts=lambda a: {
        "members": sorted((m["name"], m["fingerprint"]) for m in a["members"]),
        "base": a["base"] and a["base"]["fingerprint"],
        "proxy_tasks": sorted(a["proxy_tasks"]),
        "include_paths": task_files_hash(a["include_paths"]),
    },
    lineage=_lineage,
    describe=_describe,
)

filter_cluster = STAGE.task()
