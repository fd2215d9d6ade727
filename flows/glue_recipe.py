"""The Model-GLUE recipe as one Prefect flow.

Reads top to bottom like the paper's figure (:func:`_recipe`): fingerprint the zoo ->
evaluate it -> weight similarity -> cluster -> filter (search) and merge each cluster ->
evaluate the merged models -> mixture of the clusters' models -> leaderboard. Every stage
is a cached task keyed on content, so a rerun with nothing changed executes no stage, and
a refresh that changes one model reruns only what depends on it. ``glue plan`` walks the
same recipe without running anything and says what would rerun, and why.

Outcome: the flow completes what it can. A zoo model that cannot be read is left out and
listed (``on_model_error: skip``, the default) or fails the run (``fail``); any other
failed stage (similarity, clustering, search, merge, evaluation, mixture) fails the run.
A failed run still records what it made, then raises :class:`RunFailed`, so Prefect marks
the flow run Failed and ``glue run`` exits 1; ``flow_runs.error`` holds the reasons.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from rich.console import Console

from flows import steps
from flows._logging import RunFailed, quiet_handled_failures
from flows._recorder import Recorder, StageRunner
from flows.zoo import resolve_zoo
from model_glue.config import RunConfig, load_config, validate_mixture_families, validate_tasks
from model_glue.devices import resolve_device
from model_glue.env import glue_home
from model_glue.errors import InputError
from storage import ArtifactStore, LineageDB, LineageLockedError, default_lineage_path
from tasks.stage import stable_hash


def default_store_url(cfg: RunConfig) -> str:
    return cfg.store or str(glue_home() / "store")


def default_db_path(cfg: RunConfig) -> str:
    return cfg.lineage_db or str(default_lineage_path())


@flow(name="model-glue-recipe", log_prints=False, validate_parameters=False)
def glue_recipe(config_path: str, store: str | None = None, lineage_db: str | None = None) -> dict:
    """Run the whole recipe for the zoo described by ``config_path``; return a summary."""
    t0 = time.perf_counter()
    quiet_handled_failures()
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        cfg = load_config(config_path)
        validate_tasks(cfg, config_path)  # unknown tasks fail before any stage runs
        validate_mixture_families(cfg, config_path)  # so does an MoE of an unknown family
        resolve_device(cfg.evaluation.device)  # a GPU named in the config must be there
        _check_workers()  # so must a Dask worker that can load the stages (else: by name)
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
        summary = _recipe(cfg, rec)
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
    if flow_run.id:  # a real flow run: what Prefect's UI shows beside the task runs
        _publish(summary, db, run_id, store_url, rec)
    if failures:
        raise RunFailed(
            f"{len(failures)} failure(s): "
            + "; ".join(failures[:3])
            + ("; ..." if len(failures) > 3 else ""),
            summary,
        )
    return summary


def _check_workers() -> None:
    from flows.runners import check_workers_import, dask_client

    client = dask_client()
    if client is not None:
        check_workers_import(client)


def _publish(summary: dict, db: LineageDB, run_id: str, store_url: str, rec: Recorder) -> None:
    """The run's artifacts (leaderboard, final model, clusters) and, when the store is
    local, ``glue report``'s page for the run; their failure is a warning, never the run's."""
    from flows.artifacts import publish

    report = None
    try:
        if "://" not in store_url or store_url.startswith("file://"):
            from glue.report import write_report  # the page's renderer; reads the database only

            name = f"{summary.get('config', 'run')}-{run_id[:8]}.html"
            report = write_report(db, glue_home() / "reports" / name, run_id)
        publish(summary, db, run_id, report)
    except Exception as e:  # noqa: BLE001 - artifacts are a view; the run's result stands
        rec.say(f"artifacts not published: {type(e).__name__}: {e}", "yellow")


def _failures(cfg: RunConfig, rec: StageRunner) -> list[str]:
    """The failed stage runs that fail the run (unreadable zoo models only with ``fail``)."""
    return [
        str(f) for f in rec.failures if f.stage != "fingerprint" or cfg.on_model_error == "fail"
    ]


def _excluded(rec: StageRunner) -> dict[str, str]:
    return {f.label: f.error for f in rec.failures if f.stage == "fingerprint"}


def _recipe(cfg: RunConfig, rec: StageRunner) -> dict:
    """The paper's figure: every step is a cached stage call (see ``flows.steps``)."""
    rec.section("fingerprint")
    resolved = resolve_zoo(cfg, rec)  # hub entries downloaded, discovery expanded
    cfg = resolved.cfg
    zoo = steps.fingerprint(resolved, rec)
    rec.section("evaluate")
    steps.evaluate(zoo, cfg, rec)
    rec.section("similarity")
    sims = steps.similarity(zoo, cfg, rec)
    rec.section("cluster")
    clusters = steps.cluster(zoo, sims, cfg, rec)
    rec.section("merge")
    searched = steps.search(steps.mergeable(clusters, cfg, rec), cfg, rec)
    merged = steps.merge(searched, cfg, rec)
    steps.evaluate(list(merged.values()), cfg, rec)
    # selection reads the proxy split only: expert choice, router, final model
    rec.section("proxy")
    proxy = steps.evaluate(zoo + list(merged.values()), cfg, rec, split="proxy")
    mixture = None
    if cfg.mixture.variant != "none":
        rec.section("mixture")
        experts = steps.experts_of(clusters, searched, merged)  # one per (unfailed) cluster
        candidates = steps.candidates_of(experts, clusters)  # and every zoo model
        mixture = steps.mixture(experts, candidates, proxy, cfg, rec)
        if mixture is not None:
            steps.evaluate([mixture.ref], cfg, rec)
            proxy |= steps.evaluate([mixture.ref], cfg, rec, split="proxy")
    rec.section("final")
    made = list(merged.values()) + ([mixture.ref] if mixture else [])
    steps.final(zoo + made, proxy, cfg, rec)
    board = final = None
    if rec.flow_run_id:  # a run, not a plan: what it recorded
        board = rec.db.leaderboard(flow_run_id=rec.flow_run_id)
        final = rec.db.headline(rec.flow_run_id, board=board)
    return {
        "config": cfg.name,
        "failures": _failures(cfg, rec),
        "models": [m.name for m in zoo],
        "excluded": _excluded(rec),
        "clusters": [[m.name for m in c] for c in clusters],
        "merged": [m.name for m in merged.values()],
        "mixture": None
        if mixture is None
        else {
            "name": mixture.ref.name,
            "experts": mixture.experts,
            "router_accuracy": mixture.router_accuracy,
        },
        "final": None if final is None else final.to_dict(),
        "leaderboard": [] if board is None else board.to_dicts(),
    }


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
        if any(m.repo for m in cfg.zoo) or cfg.zoo_from:  # stages read hub snapshots there
            hub_cache = Path(cfg.hub_cache or _default_hub_cache())
            hub_cache.mkdir(parents=True, exist_ok=True)
            check_store_visible(cfg.runner.address, str(hub_cache), "hub_cache")
    return flow_fn.with_options(task_runner=runner)


def _default_hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
