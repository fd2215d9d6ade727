"""Stage 3a: filter and search inside a cluster (Model-GLUE's selective merging).

Decides which members of a cluster to merge and with which coefficients, scoring every
trial on the proxy tasks (lm-eval with a ``limit``) on a model merged in memory: no
checkpoint is written per trial. Returns the accepted members with the engine parameters
that reproduce the best trial exactly, the rejected members with the reason, and every
trial for the lineage ``trials`` table.
"""

from __future__ import annotations

from importlib.metadata import version

from model_glue.merge.spec import ENGINE_VERSION
from storage import ArtifactStore
from tasks._stage import Stage, load_record, save_record
from tasks.evaluate import task_files_hash

SEARCH_VERSION = "1"

STAGE = Stage(
    name="filter",
    # the search merges through the engine and scores through lm-eval: both change numbers
    code_version=f"filter-{SEARCH_VERSION}-{ENGINE_VERSION}-lm_eval-{version('lm-eval')}",
    key_parts=lambda members, base, method, params, settings, proxy_tasks, proxy_limit, include_paths, proxy_metric=None, device="cpu", dtype="float32", batch_size=32, allow_code_execution=False: {
        "members": sorted((m["name"], m["fingerprint"]) for m in members),
        "base": base["fingerprint"] if base else None,
        "method": method,
        "params": params,
        "settings": settings,
        "proxy": [sorted(proxy_tasks), proxy_limit, task_files_hash(include_paths)]
        + ([proxy_metric] if proxy_metric else []),
        "dtype": dtype,  # the device and batch size do not change the scores
    },
)


def _filter(
    store_url: str,
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
) -> dict:
    """``settings``: strategy plus its options (grid; budget, sigma0, seed, layer_groups,
    search_density). ``members`` never include ``base`` (it enters as the task-vector origin)."""
    store = ArtifactStore(store_url)
    key = STAGE.key(
        {
            "members": members,
            "base": base,
            "method": method,
            "params": params,
            "settings": settings,
            "proxy_tasks": proxy_tasks,
            "proxy_limit": proxy_limit,
            "include_paths": include_paths,
            "proxy_metric": proxy_metric,
            "device": device,
            "dtype": dtype,
            "batch_size": batch_size,
            "allow_code_execution": allow_code_execution,
        }
    )
    if (record := load_record(store, key)) is not None:
        return record
    # imported here: the search stack (CMA-ES/scipy, transformers) costs seconds; cached reruns skip it
    from model_glue.evaluate import quiet_lm_eval
    from model_glue.search import evolutionary_search, greedy_selective_merge
    from model_glue.search.engine_params import engine_model_params
    from model_glue.search.proxy import ProxyScorer

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
        )
        strategy = settings["strategy"]
        if strategy == "evolutionary":
            result = evolutionary_search(
                names,
                scorer,
                method=method,
                layer_groups=settings["layer_groups"],
                search_density=settings["search_density"],
                budget=settings["budget"],
                sigma0=settings["sigma0"],
                seed=settings["seed"],
            )
        else:
            result = greedy_selective_merge(
                names,
                None,
                scorer,
                strategy=strategy,
                method=method,
                grid=settings["grid"],
                similarity=scorer.similarity if strategy == "similarity" else None,
                min_gain=settings["min_gain"],
            )
    engine_params = engine_model_params(result.spec, scorer.num_layers)
    merge_s = sum(c.merge_seconds for c in scorer.costs)
    eval_s = sum(c.eval_seconds for c in scorer.costs)
    record = {
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
    return save_record(store, key, record, STAGE.name)


filter_cluster = STAGE.task(_filter)
