"""The Model-GLUE recipe as one Prefect flow.

Reads top to bottom like the paper's figure: fingerprint the zoo -> weight similarity ->
cluster -> filter and merge each cluster -> evaluate every zoo and merged model ->
mixture -> leaderboard. Every stage is a cached task keyed on content, so a rerun with
nothing changed executes no stage, and a refresh that changes one model reruns only what
depends on it.

Outcome: the flow completes what it can. A zoo model that cannot be read is left out and
listed (``on_model_error: skip``, the default) or fails the run (``fail``); any other
failed stage (similarity, clustering, search, merge, evaluation, mixture) fails the run.
A failed run still records what it made, then raises :class:`RunFailed`, so Prefect marks
the flow run Failed and ``glue run`` exits 1; ``flow_runs.error`` holds the reasons.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from rich.console import Console

from flows._logging import RunFailed, quiet_handled_failures
from flows._recorder import Failure, Recorder
from model_glue.config import RunConfig, load_config, validate_tasks
from model_glue.devices import dtype_label, resolve_device, resolve_dtype
from model_glue.env import glue_home
from model_glue.errors import InputError
from model_glue.merge import METHODS
from storage import ArtifactStore, LineageDB, LineageLockedError
from tasks._stage import stable_hash
from tasks.cluster import cluster_zoo
from tasks.evaluate import evaluate_model
from tasks.filter import filter_cluster
from tasks.fingerprint import fingerprint_model
from tasks.merge import MODEL_KIND, merge_cluster
from tasks.mixture import assign_prompts, build_mixture
from tasks.similarity import compute_similarity


def default_store_url(cfg: RunConfig) -> str:
    return cfg.store or str(glue_home() / "store")


def default_db_path(cfg: RunConfig) -> str:
    return cfg.lineage_db or str(glue_home() / "lineage.duckdb")


@flow(name="model-glue-recipe", log_prints=False, validate_parameters=False)
def glue_recipe(config_path: str, store: str | None = None, lineage_db: str | None = None) -> dict:
    """Run the whole recipe for the zoo described by ``config_path``; return a summary."""
    t0 = time.perf_counter()
    quiet_handled_failures()
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        cfg = load_config(config_path)
        validate_tasks(cfg, config_path)  # unknown tasks fail before any stage runs
        resolve_device(cfg.evaluation.device)  # a GPU named in the config must be there
    except InputError as e:
        raise RunFailed(str(e)) from None
    store_url = store or default_store_url(cfg)
    ArtifactStore(store_url).sweep_tmp()  # leftovers of killed runs
    db = LineageDB(lineage_db or default_db_path(cfg))
    run_id = str(flow_run.id or f"local-{time.time_ns()}")
    db.start_flow_run(
        run_id, flow="model-glue-recipe", config_hash=stable_hash(cfg.model_dump(mode="json"))
    )
    rec = Recorder(db, store_url, run_id, console)
    summary: dict = {"config": cfg.name, "excluded": {}, "failures": []}
    try:
        summary = _recipe(cfg, rec, db, store_url, console)
    except RunFailed as e:  # a stage every later one needs failed: report what there is
        summary["failures"] = [*_failures(cfg, rec), str(e)]
        summary["excluded"] = _excluded(rec)
    except LineageLockedError as e:  # another process kept the database: say so, in one line
        raise RunFailed(str(e), summary) from None
    except BaseException as e:
        db.finish_flow_run(run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    summary.update(
        flow_run_id=run_id, seconds=round(time.perf_counter() - t0, 2), counts=rec.counts
    )
    failures = summary["failures"]
    notes = [f"left out {n}: {why}" for n, why in summary["excluded"].items()]
    db.finish_flow_run(
        run_id, "failed" if failures else "completed", "\n".join(failures + notes) or None
    )
    if failures:
        raise RunFailed(
            f"{len(failures)} failure(s): "
            + "; ".join(failures[:3])
            + ("; ..." if len(failures) > 3 else ""),
            summary,
        )
    return summary


def _failures(cfg: RunConfig, rec: Recorder) -> list[str]:
    """The failed stage runs that fail the run (unreadable zoo models only with ``fail``)."""
    return [
        str(f) for f in rec.failures if f.stage != "fingerprint" or cfg.on_model_error == "fail"
    ]


def _excluded(rec: Recorder) -> dict[str, str]:
    return {f.label: f.error for f in rec.failures if f.stage == "fingerprint"}


def _recipe(cfg: RunConfig, rec: Recorder, db: LineageDB, store_url: str, console: Console) -> dict:
    # 0. Fingerprint: a broken model is reported and left out; the rest goes on.
    console.rule("[bold]fingerprint")
    outcomes = rec.run_many(
        fingerprint_model, [(m.name, {"name": m.name, "uri": m.path}) for m in cfg.zoo]
    )
    models, excluded = [], {}
    with db.transaction():
        _record_models(db, outcomes, models, excluded)
    for m in [m for m in models if m.get("nonfinite")]:
        bad = m["nonfinite"]
        what = f"tensor {bad[0]!r}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        why = f"CheckpointError: {m['uri']}: {what} holds NaN or Inf values"
        if cfg.allow_nonfinite:
            console.print(
                f"  [yellow]kept {m['name']} (allow_nonfinite): {why}[/]", highlight=False
            )
            continue
        console.print(
            f"  [yellow]left out {m['name']}: {why}; allow_nonfinite: true keeps it[/]",
            highlight=False,
            soft_wrap=True,
        )
        excluded[m["name"]] = why
        rec.failures.append(Failure("fingerprint", m["name"], why, True))
        models.remove(m)
    if not models:
        raise RunFailed("no usable model in the zoo")
    by_fp = {m["fingerprint"]: m for m in models}
    name_of = {fp: m["name"] for fp, m in by_fp.items()}

    # 1. Similarity within each architecture group (pairs are cached one by one).
    console.rule("[bold]similarity")
    arch_groups: dict[str, list[dict]] = defaultdict(list)
    for m in models:
        arch_groups[m["arch_signature"]].append(m)
    groups = list(cfg.similarity.groups)
    sim_keys = []
    for arch, members in sorted(arch_groups.items()):
        if len(members) < 2:
            continue
        # raw weights over the whole group (what clustering uses), then task vectors inside
        # each declared base family of two or more fine-tunes
        calls = [(f"{len(members)} models, arch {arch[:8]}", members, None)]
        for base, family in _base_families(members, cfg):
            calls.append(
                (f"task vectors of {len(family) - 1} fine-tunes of {base['name']}", family, base)
            )
        for label, group, base in calls:
            o = rec.run(
                compute_similarity,
                label,
                models=_refs(group),
                groups=groups,
                base=_refs([base])[0] if base else None,
            )
            if o.record is None:
                raise RunFailed(f"similarity {label} failed")
            if base is None:
                sim_keys.append(o.record["key"])
            name = f"similarity:{arch[:8]}" + (f":vs-{base['name']}" if base else "")
            with db.transaction():  # the artifact and its details, or neither
                if db.record_artifact(
                    o.record["key"],
                    kind="similarity",
                    name=name,
                    uri=ArtifactStore(store_url).uri("record", o.record["key"]),
                    stage="similarity",
                    run_id=o.run_id,
                    parents=[m["fingerprint"] for m in group],
                ):
                    tensor_set = ",".join(sorted(groups))
                    rows = (
                        o.record["pairs"]
                        if base is None
                        else [r for r in o.record["pairs"] if r["metric"] == "task_vector_cosine"]
                    )
                    db.record_similarities(
                        [{**r, "tensor_set": tensor_set} for r in rows], o.run_id
                    )
                    if base is None:
                        db.record_tensor_similarities(o.record["tensor_pairs"], o.run_id)

    # 2. Clustering: architecture first, then complete linkage at the threshold.
    console.rule("[bold]cluster")
    sc = cfg.similarity
    o = rec.run(
        cluster_zoo,
        f"threshold {sc.threshold} on {sc.metric}",
        models=_refs(models, arch=True),
        similarity_keys=sim_keys,
        metric=sc.metric,
        threshold=sc.threshold,
        related=_related_pairs(models, cfg),
    )
    if o.record is None:
        raise RunFailed("clustering failed")
    clusters = o.record["clusters"]
    with db.transaction():
        if db.record_artifact(
            o.record["key"],
            kind="clustering",
            name="clustering",
            stage="cluster",
            uri=ArtifactStore(store_url).uri("record", o.record["key"]),
            run_id=o.run_id,
            parents=sim_keys or [m["fingerprint"] for m in models],
        ):
            db.record_clusters(
                o.record["key"],
                [[mm["fingerprint"] for mm in c["members"]] for c in clusters],
                o.run_id,
            )
            db.record_thresholds(
                o.record["key"], sc.metric, o.record.get("thresholds", []), o.run_id
            )
    for t in o.record.get("thresholds", []):
        if t["rule"] == "widest-gap":
            console.print(
                f"  threshold {t['threshold']:.3f} on {sc.metric} (auto: widest gap "
                f"{t['gap_low']:.3f}..{t['gap_high']:.3f} among {len(t['values'])} pairs, "
                f"arch {t['arch_signature'][:8]})",
                highlight=False,
            )
    for i, c in enumerate(clusters):
        names = ", ".join(name_of[mm["fingerprint"]] for mm in c["members"])
        low = (
            ""
            if c["min_similarity"] is None
            else f" (lowest internal {sc.metric} {c['min_similarity']:.3f})"
        )
        console.print(f"  cluster {i}: {names}{low}", highlight=False)

    # 3. Merge every cluster of two or more models; a singleton cluster stands for itself.
    console.rule("[bold]merge")
    store = ArtifactStore(store_url)
    outputs: list[dict | None] = []  # one model per cluster (in cluster order): the experts
    merged: list[str] = []
    failed_clusters: list[str] = []  # failures that are not a stage run
    plans = []  # (slot in outputs, anchor, members, base) of the clusters to search or merge
    for c in clusters:
        members = [by_fp[mm["fingerprint"]] for mm in c["members"]]
        if len(members) == 1:
            outputs.append(_zoo_target(members[0]))
            continue
        anchor = _anchor(members, cfg)
        base = None
        if METHODS[cfg.merge.method].base != "none":  # task vectors: the cluster's declared base
            base = next((m for m in members if m["name"] == anchor), None)
            if base is None:
                failed_clusters.append(
                    f"merge cluster of {anchor}: {cfg.merge.method} needs a base; no declared base in it"
                )
                rec.console.print(f"  [red]{failed_clusters[-1]}[/]", highlight=False)
                continue
            members = [m for m in members if m is not base]
        plans.append((len(outputs), anchor, _refs(members), base))
        outputs.append(None)
    # every cluster's search at once (on Dask; in turn on threads), then every merge
    searched = [p for p in plans if cfg.filter.strategy != "none" and len(p[2]) > 1]
    calls = [_search_call(members, base, anchor, cfg) for _, anchor, members, base in searched]
    found = dict(zip([p[0] for p in searched], _run_all(rec, filter_cluster, calls), strict=True))
    to_merge = []
    for slot, anchor, members, base in plans:
        if slot in found:
            members = _accepted(found[slot], members, anchor, rec, db)
            if members is None:
                continue  # the recorder printed why; the run will be marked failed
            if len(members) == 1 and base is None:  # nothing merges with the best: it stands alone
                outputs[slot] = _zoo_target(by_fp[members[0]["fingerprint"]])
                continue
        to_merge.append((slot, anchor, members, base))
    calls = []
    for _, anchor, members, base in to_merge:
        label = f"merge-{anchor}-{cfg.merge.method}" + (
            "" if cfg.filter.strategy == "none" else f"-{cfg.filter.strategy}"
        )
        calls.append(
            (
                label,
                {
                    "label": label,
                    "members": members,
                    "method": cfg.merge.method,
                    "params": dict(cfg.merge.params),
                    "dtype": cfg.merge.dtype,
                    "base": _refs([base])[0] if base else None,
                },
            )
        )
    for (slot, _, members, base), (label, _), o in zip(
        to_merge, calls, _run_all(rec, merge_cluster, calls), strict=True
    ):
        if o.record is None:
            continue  # the recorder printed why; the run will be marked failed
        r = o.record
        merged.append(label)
        outputs[slot] = {
            "name": label,
            "artifact_id": r["artifact_id"],
            "fingerprint": r["fingerprint"],
            "path": str(store.local_path(MODEL_KIND, r["artifact_id"])),
            "dtype": cfg.merge.dtype or members[0].get("dtype"),
        }
        with db.transaction():
            db.record_artifact(
                r["artifact_id"],
                kind="merged",
                name=label,
                uri=r["uri"],
                stage="merge",
                content_hash=r["fingerprint"],
                run_id=o.run_id,
                parents=[mm["fingerprint"] for mm in r["members"]],
                role="member",
            )
            if base is not None:  # a task-vector merge: its base is a parent too
                db.record_edges([base["fingerprint"]], r["artifact_id"], o.run_id, role="base")
    outputs = [o for o in outputs if o is not None]

    # 4. Evaluate every zoo model and every merged model (one at a time: CPU-bound).
    console.rule("[bold]evaluate")
    targets = [_zoo_target(m) for m in models]
    scores = _evaluate_all(
        targets + [o for o in outputs if o["name"] in merged], cfg, rec, db, store
    )

    # 5. Model-level mixture over the clusters' models, then its own evaluation.
    mixture = None
    if cfg.mixture.variant != "none" and len(outputs) >= 2:
        console.rule("[bold]mixture")
        mixture = _mixture(outputs, scores, cfg, rec, db, store)
        if mixture is not None:
            _evaluate_all([mixture], cfg, rec, db, store)

    # 6. Leaderboard: zoo models vs merged models vs the mixture.
    board = db.leaderboard(flow_run_id=rec.flow_run_id)
    return {
        "config": cfg.name,
        "failures": _failures(cfg, rec) + failed_clusters,
        "models": [m["name"] for m in models],
        "excluded": excluded,
        "clusters": [[name_of[mm["fingerprint"]] for mm in c["members"]] for c in clusters],
        "merged": merged,
        "mixture": None
        if mixture is None
        else {"name": mixture["name"], "router_accuracy": mixture["router_accuracy"]},
        "leaderboard": board.to_dicts(),
    }


def _search_call(
    members: list[dict], base: dict | None, anchor: str, cfg: RunConfig
) -> tuple[str, dict]:
    """The filter stage's call for one cluster: its label and parameters."""
    fc = cfg.filter
    tasks = list(fc.proxy_tasks or cfg.evaluation.tasks)
    return (
        f"{fc.strategy} search in cluster of {anchor} ({len(members)} candidates)",
        {
            "members": members,
            "base": _refs([base])[0] if base else None,
            "method": cfg.merge.method,
            "params": dict(cfg.merge.params),
            "settings": fc.search_settings(),
            "proxy_tasks": tasks,
            "proxy_limit": fc.proxy_limit,
            "include_paths": list(cfg.evaluation.include_paths),
            "proxy_metric": cfg.metrics_for(tasks),
            "batch_size": cfg.evaluation.batch_size,
            "allow_code_execution": cfg.evaluation.allow_code_execution,
        }
        | _placement(cfg, members[0].get("dtype")),
    )


def _accepted(
    o, members: list[dict], anchor: str, rec: Recorder, db: LineageDB
) -> list[dict] | None:
    """Record a cluster's search; return the accepted members with their engine parameters."""
    if o.record is None:
        return None
    r = o.record
    with db.transaction():
        if db.record_artifact(
            r["key"],
            kind="search",
            name=f"search:{anchor}",
            stage="filter",
            uri=ArtifactStore(rec.store_url).uri("record", r["key"]),
            run_id=o.run_id,
            parents=[m["fingerprint"] for m in members],
            meta={"accepted": [a["name"] for a in r["accepted"]], "rejected": r["rejected"]},
        ):
            db.record_trials([{"search_id": r["key"], **t} for t in r["trials"]], o.run_id)
    rec.console.print(f"  search in cluster of {anchor}:", highlight=False)
    for a in r["accepted"]:
        rec.console.print(f"  accepted {a['name']:<10} {a['params']}", highlight=False)
    for name, why in sorted(r["rejected"].items()):
        rec.console.print(f"  [yellow]rejected {name:<10}[/] {why}", highlight=False)
    rec.console.print(
        f"  best proxy score {r['best_score']:.3f} after {r['evaluations']} proxy evaluations "
        f"(merging {r['merge_seconds']:.1f} s, evaluating {r['eval_seconds']:.1f} s)",
        highlight=False,
    )
    by_name = {m["name"]: m for m in members}
    return [
        {
            **{k: by_name[a["name"]][k] for k in ("name", "uri", "fingerprint")},
            "params": a["params"],
        }
        for a in r["accepted"]
    ]


def _evaluate_all(
    targets: list[dict], cfg: RunConfig, rec: Recorder, db: LineageDB, store: ArtifactStore
) -> dict[str, dict[str, float]]:
    """Evaluate each target (name, artifact_id, fingerprint, path[, loader]); return the
    mean value per task for every target that was evaluated."""
    ev = cfg.evaluation
    out: dict[str, dict[str, float]] = {}
    calls = []
    for t in targets:
        model = {k: t[k] for k in ("name", "fingerprint", "path")} | (
            {"loader": t["loader"]} if "loader" in t else {}
        )
        params = {
            "model": model,
            "tasks": list(ev.tasks),
            "limit": ev.limit,
            "batch_size": ev.batch_size,
            "include_paths": list(ev.include_paths),
            "backend": ev.backend,
            "allow_code_execution": ev.allow_code_execution,
        } | _placement(cfg, t.get("dtype"), mixture=t.get("loader") == "mixture")
        calls.append((t["name"], params))
    for t, o in zip(targets, _run_all(rec, evaluate_model, calls), strict=True):
        if o.record is None:
            continue
        with db.transaction():
            db.record_artifact(
                o.record["key"],
                kind="evaluation",
                name=f"eval:{t['name']}",
                stage="evaluate",
                uri=store.uri("record", o.record["key"]),
                run_id=o.run_id,
                parents=[t["artifact_id"]],
            )
            db.record_scores(t["artifact_id"], o.run_id, o.record["scores"], eval_limit=ev.limit)
        per_task: dict[str, list[float]] = defaultdict(list)
        for sc in o.record["scores"]:
            per_task[sc["task"]].append(sc["value"])
        out[t["name"]] = {task: sum(v) / len(v) for task, v in per_task.items()}
    return out


def _run_all(rec: Recorder, task, calls: list[tuple[str, dict]]) -> list:
    """Independent stage calls: all at once on a Dask runner (worker processes), one after
    the other on the flow's threads (lm-eval seeds global RNGs: threads would interleave)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None)
    if type(runner).__name__ == "DaskTaskRunner":
        return rec.run_many(task, calls)
    return [rec.run(task, label, **params) for label, params in calls]


def _mixture(
    outputs: list[dict],
    scores: dict[str, dict[str, float]],
    cfg: RunConfig,
    rec: Recorder,
    db: LineageDB,
    store: ArtifactStore,
) -> dict | None:
    mc = cfg.mixture
    experts = sorted(outputs, key=lambda o: o["name"])
    prompts = None
    if mc.prompts:
        prompts = assign_prompts([e["name"] for e in experts], scores, dict(mc.prompts))
        experts = [e for e in experts if e["name"] in prompts]
    if len(experts) < 2:
        rec.console.print(
            f"  mixture skipped: {experts[0]['name']} is the best expert on every task",
            highlight=False,
        )
        return None
    backbone = max(experts, key=lambda e: (sum(scores.get(e["name"], {}).values()), e["name"]))
    label = f"mixture-{mc.variant}-{mc.router}"
    o = rec.run(
        build_mixture,
        label,
        experts=[{k: e[k] for k in ("name", "fingerprint", "path")} for e in experts],
        backbone={k: backbone[k] for k in ("name", "fingerprint", "path")},
        router=mc.router,
        layer=mc.layer,
        pooling=mc.pooling_used,
        prompts=prompts or {},
        accuracy_tasks=list(cfg.evaluation.tasks)
        if mc.router_accuracy and mc.variant == "model_level"
        else [],
        accuracy_limit=cfg.evaluation.limit,
        include_paths=list(cfg.evaluation.include_paths),
        accuracy_metric=cfg.metrics_for(list(cfg.evaluation.tasks)),
        variant=mc.variant,
        hybrid_k=mc.hybrid_k,
        top_k=mc.top_k,
    )
    if o.record is None:
        return None  # the recorder printed why; the run will be marked failed
    r = o.record
    db.record_artifact(
        r["artifact_id"],
        kind="mixture",
        name=label,
        uri=r["uri"],
        stage="mixture",
        content_hash=r["fingerprint"],
        run_id=o.run_id,
        parents=[e["artifact_id"] for e in experts],
        role="expert",
        meta={
            "variant": mc.variant,
            "router": r["router"],
            "layer": r["layer"],
            "backbone": r["backbone"],
            "router_accuracy": r["router_accuracy"],
        },
    )
    for a in r["router_accuracy"]:
        rec.console.print(
            f"  router accuracy {a['task']:<12} {a['value']:.3f} (n={a['n_samples']})",
            highlight=False,
        )
    return {
        "name": label,
        "artifact_id": r["artifact_id"],
        "fingerprint": r["fingerprint"],
        "path": r["path"],
        # model- and block-level mixtures evaluate through our lm-eval model; FFN-level and
        # hybrid ones are Mixtral directories that transformers loads (float32, as built)
        **(
            {"loader": "mixture"}
            if mc.variant in ("model_level", "block_level")
            else {"dtype": "F32"}
        ),
        "router_accuracy": r["router_accuracy"],
    }


def _record_models(
    db: LineageDB, outcomes: list, models: list[dict], excluded: dict[str, str]
) -> None:
    for o in outcomes:
        if o.record is None:
            excluded[o.label] = o.error or "failed"
            continue
        models.append(o.record)
        db.record_model(
            fingerprint=o.record["fingerprint"],
            name=o.record["name"],
            uri=o.record["uri"],
            architecture=o.record["architecture"],
            arch_signature=o.record["arch_signature"],
            param_count=o.record["param_count"],
            dtype=o.record["dtype"],
            bytes=o.record["bytes"],
            run_id=o.run_id,
        )


def _zoo_target(m: dict) -> dict:
    """A zoo model as an evaluation target / mixture expert (its artifact id is its fingerprint)."""
    return {
        "name": m["name"],
        "artifact_id": m["fingerprint"],
        "fingerprint": m["fingerprint"],
        "path": m["uri"],
        "dtype": m.get("dtype"),
    }


def _placement(cfg: RunConfig, stored: str | None, mixture: bool = False) -> dict:
    """Device, batch size and the resolved evaluation dtype (what cache keys hold) for a
    model stored in ``stored``. Mixtures run on the CPU in float32 (their own loader)."""
    ev = cfg.evaluation
    if mixture:
        return {"device": "cpu", "dtype": "float32"}
    device = resolve_device(ev.device)
    return {"device": device, "dtype": dtype_label(resolve_dtype(ev.dtype, device, stored))}


def _refs(models: list[dict], arch: bool = False) -> list[dict]:
    """The small part of fingerprint records that later stages need (and key on)."""
    keys = ("name", "uri", "fingerprint") + (("arch_signature",) if arch else ())
    return [
        {k: m[k] for k in keys} | ({"dtype": m["dtype"]} if "dtype" in m else {})
        for m in sorted(models, key=lambda m: m["fingerprint"])
    ]


def _base_families(members: list[dict], cfg: RunConfig) -> list[tuple[dict, list[dict]]]:
    """(base, base + its fine-tunes) for each declared base in ``members`` with 2+ fine-tunes."""
    declared = {z.name: z.base for z in cfg.zoo}
    by_name = {m["name"]: m for m in members}
    out = []
    for base_name in sorted({declared.get(n) for n in by_name} - {None}):
        tunes = [m for n, m in sorted(by_name.items()) if declared.get(n) == base_name]
        if base_name in by_name and len(tunes) >= 2:
            out.append((by_name[base_name], [by_name[base_name], *tunes]))
    return out


def _related_pairs(models: list[dict], cfg: RunConfig) -> list[list[str]]:
    """Fingerprint pairs that declared ``base:`` relations put in one family: each fine-tune
    with its base, and fine-tunes of one base with each other."""
    fp = {m["name"]: m["fingerprint"] for m in models}
    family: dict[str, list[str]] = defaultdict(list)
    for z in cfg.zoo:
        if z.base is not None and z.name in fp:
            family[z.base].append(fp[z.name])
    pairs = set()
    for base, tunes in family.items():
        members = tunes + ([fp[base]] if base in fp else [])
        pairs |= {tuple(sorted((a, b))) for a in members for b in members if a != b}
    return [list(p) for p in sorted(pairs)]


def _anchor(members: list[dict], cfg: RunConfig) -> str:
    """A readable name for a cluster: its declared common base if any, else its first member."""
    names = {m["name"] for m in members}
    bases = sorted({z.base for z in cfg.zoo if z.name in names and z.base in names})
    return bases[0] if bases else sorted(names)[0]


def run_config(
    config_path: str | Path,
    *,
    store: str | None = None,
    lineage_db: str | None = None,
    runner: str | None = None,
) -> dict:
    """Run the recipe on the config's task runner (``runner`` overrides its kind)."""
    return with_runner(glue_recipe, load_config(config_path), runner)(
        str(config_path), store=store, lineage_db=lineage_db
    )


def with_runner(flow_fn, cfg: RunConfig, kind: str | None = None):
    """``flow_fn`` on the task runner ``cfg.runner`` asks for (threads: as it is)."""
    from flows.runners import check_store_visible, task_runner

    runner = task_runner(cfg.runner, kind)
    if runner is None:
        return flow_fn
    if cfg.runner.address:
        check_store_visible(cfg.runner.address, default_store_url(cfg))
    return flow_fn.with_options(task_runner=runner)
