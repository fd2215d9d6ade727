"""The recipe's steps: each builds its stage calls from typed references, runs them
through the recorder (or a planner) and turns the records into references for the next.

No step writes to the database or the store itself: the stage protocol (``tasks.stage``)
does, through the recorder. A step raises :class:`RunFailed` when a stage that every later
one needs has no result.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from flows._logging import RunFailed
from flows._recorder import Failure, Outcome, StageRunner
from flows.zoo import Source, Zoo
from model_glue.config import RunConfig
from model_glue.devices import dtype_label, resolve_device, resolve_dtype
from model_glue.errors import InputError
from model_glue.merge import METHODS
from model_glue.mixture.routers.base import ROUTERS
from tasks.adapter import apply_lora
from tasks.cluster import cluster_zoo
from tasks.evaluate import evaluate_model
from tasks.filter import filter_cluster
from tasks.fingerprint import fingerprint_model
from tasks.merge import merge_cluster
from tasks.mixture import assign_prompts, mix_experts
from tasks.refs import ModelRef, by_fingerprint
from tasks.select import choose_final, select_experts
from tasks.similarity import compute_similarity
from tasks.stage import call

Scores = dict[str, dict[str, float]]  # model name -> task -> mean value


@dataclass(frozen=True)
class Cluster:
    """A cluster to merge: its position in the clustering, a readable anchor, the members,
    (task vectors) its base and the members its search accepted, with engine parameters."""

    index: int
    anchor: str
    members: list[ModelRef]
    base: ModelRef | None = None
    accepted: list[dict] = field(default_factory=list)  # members with engine params


def fingerprint(zoo: Zoo, rec: StageRunner) -> list[ModelRef]:
    """Every readable zoo model; unreadable ones are reported by the recorder and left out,
    and so are models holding NaN/Inf unless ``allow_nonfinite``. Adapters are applied to
    their base once the base is fingerprinted, then fingerprinted like any model."""
    cfg = zoo.cfg
    entries = [m for m in cfg.zoo if m.name in zoo.sources]
    adapters = {m.name for m in entries if _is_adapter(zoo.sources[m.name])}
    vocabs: dict[str, dict | None] = {}
    models = _fingerprinted([m for m in entries if m.name not in adapters], zoo, rec, vocabs)
    if adapters:
        models += _adapted([m for m in entries if m.name in adapters], models, zoo, rec, vocabs)
    if not models:
        raise RunFailed("no usable model in the zoo")
    same: dict[str, list[str]] = defaultdict(list)
    for m in models:
        same[m.fingerprint].append(m.name)
    for fp, names in same.items():
        if len(names) > 1:  # one model for every later stage, under the first name
            rec.say(
                f"{', '.join(names)} hold the same weights (fingerprint {fp[:8]}): "
                "one model for clustering and merging",
                "yellow",
            )
    return _vocabulary_families(models, vocabs, rec)


def _vocabulary_families(
    models: list[ModelRef], vocabs: dict[str, dict | None], rec: StageRunner
) -> list[ModelRef]:
    """Models of one architecture whose vocabularies differ are clustered together only
    when one extends the other (a fine-tune that appended tokens to its base's); any other
    is kept apart, as an architecture group of its own, with one line saying why."""
    from model_glue.merge.tokenizer import tokens_of, vocab_families

    by_arch: dict[str, list[ModelRef]] = defaultdict(list)
    for m in models:
        by_arch[m.arch_signature or ""].append(m)
    moved: dict[str, str] = {}
    for arch, members in by_arch.items():
        digests = {(vocabs.get(m.name) or {}).get("hash") for m in members}
        if len(digests) < 2 or None in digests or "://" in "".join(m.uri for m in members):
            continue  # one vocabulary (or none to compare)
        family, why = vocab_families({m.name: tokens_of(m.uri) for m in members})
        for m in members:
            if m.name in why:  # not in the main family: an architecture group of its own
                moved[m.name] = f"{arch}~{family[m.name]}"
                main = [n for n, f in family.items() if n not in why]
                rec.say(
                    f"{m.name}: kept apart from {', '.join(sorted(main))}: {why[m.name]} "
                    "(one vocabulary does not extend the other)",
                    "yellow",
                )
    return [replace(m, arch_signature=moved[m.name]) if m.name in moved else m for m in models]


def _is_adapter(src: Source) -> bool:
    from model_glue.adapters import is_adapter

    if src.hub is not None:
        return "adapter_config.json" in src.hub["files"]
    return src.path is not None and is_adapter(src.path)


def _local_base(named: str | None, adapter_dir: str) -> str | None:
    """An adapter's ``base_model_name_or_path`` as a local model directory, if it is one
    (absolute, or relative to the adapter's directory)."""
    from pathlib import Path

    if not named or "://" in adapter_dir:
        return None
    path = Path(named).expanduser()
    path = path if path.is_absolute() else Path(adapter_dir) / path
    return str(path.resolve()) if (path / "config.json").is_file() else None


def _outside_base(
    name: str, folder: str, zoo: Zoo, rec: StageRunner, vocabs: dict[str, dict | None]
) -> ModelRef | None:
    """The base of adapter ``name`` from a directory outside the zoo, fingerprinted under
    ``<name>.base`` (it is not a zoo model: not evaluated, clustered or merged)."""
    from model_glue.config import ZooModel

    label = f"{name}.base"
    found = _fingerprinted(
        [ZooModel(name=label, path=folder)], zoo, rec, vocabs, {label: {"uri": folder}}
    )
    vocabs.pop(label, None)
    return found[0] if found else None


def _fingerprinted(
    entries: list,
    zoo: Zoo,
    rec: StageRunner,
    vocabs: dict[str, dict | None],
    sources: dict[str, dict] | None = None,
) -> list[ModelRef]:
    """Fingerprint ``entries`` (zoo entries with a source); ``sources``: per name, the
    source of a model that is not the entry's own (an applied adapter's directory).
    ``vocabs`` gets each model's vocabulary digest."""
    cfg, sources = zoo.cfg, sources or {}
    uris = {
        m.name: sources[m.name]["uri"] if m.name in sources else zoo.sources[m.name].path
        for m in entries
    }
    calls = []
    for m in entries:
        own = zoo.sources.get(m.name)
        source = sources.get(m.name, {}).get("source") or (own.hub if own else None)
        calls.append(call(fingerprint_model, m.name, name=m.name, uri=uris[m.name], source=source))
    models = []
    for m, o in zip(entries, rec.run_many(calls), strict=True):
        if o.record is None:
            continue
        if bad := o.record.get("nonfinite"):
            what = f"tensor {bad[0]!r}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            why = f"CheckpointError: {o.record['uri']}: {what} holds NaN or Inf values"
            if not cfg.allow_nonfinite:
                rec.say(f"left out {m.name}: {why}; allow_nonfinite: true keeps it", "yellow")
                rec.failures.append(Failure("fingerprint", m.name, why, True))
                continue
            rec.say(f"kept {m.name} (allow_nonfinite): {why}", "yellow")
        if o.record.get("layout_inferred"):
            rec.say(f"{m.name}: {o.record['layout']} (not in the architecture catalog)", "yellow")
        vocabs[m.name] = o.record.get("vocab")
        # where the files are now (a hub snapshot's record may name an older snapshot)
        models.append(replace(ModelRef.zoo(o.record, m.name), uri=uris[m.name]))
    return models


def _adapted(
    entries: list,
    bases: list[ModelRef],
    zoo: Zoo,
    rec: StageRunner,
    vocabs: dict[str, dict | None],
) -> list[ModelRef]:
    """Each adapter applied to its base (``base:``, else the adapter's own
    ``base_model_name_or_path`` when that names a zoo model or repo, or a local directory,
    which is then fingerprinted as the adapter's base, not as a zoo model), then
    fingerprinted."""
    from model_glue.adapters import read_adapter

    by_name = {m.name: m for m in bases}
    by_repo = {z.repo: z.name for z in zoo.cfg.zoo if z.repo}
    calls, adapted = [], []
    for m in entries:
        src = zoo.sources[m.name]
        try:
            named = m.base or read_adapter(src.path).base_model_name_or_path
        except InputError as e:
            named, why = None, " ".join(str(e).split())
        else:
            why = (
                f"its base {named!r} is neither a zoo model nor a local directory "
                "(add it to the zoo, or set base:)"
            )
        base = by_name.get(named) or by_name.get(by_repo.get(named, ""))
        if base is None and m.base is None and (folder := _local_base(named, src.path)):
            base = _outside_base(m.name, folder, zoo, rec, vocabs)
        if base is None:
            if m.base is not None and m.base not in by_name:
                why = f"its base {m.base!r} was left out"
            rec.say(f"left out {m.name}: adapter: {why}", "yellow")
            rec.failures.append(Failure("fingerprint", m.name, f"adapter: {why}", True))
            continue
        calls.append(
            call(
                apply_lora,
                m.name,
                name=m.name,
                adapter=src.path,
                base=base,
                allow_pickle=zoo.cfg.allow_pickle,
            )
        )
        adapted.append(m)
    made = {}
    for m, c, o in zip(adapted, calls, rec.run_many(calls), strict=True):
        if o.record is not None:
            base_fp = c.params["base"]["fingerprint"]
            # (planning: a stale adapter's stand-in has no fingerprint yet)
            source = {"adapter": o.record.get("adapter_fingerprint"), "base": base_fp}
            if hub := zoo.sources[m.name].hub:
                source |= {k: hub[k] for k in ("repo", "revision", "commit")}
            made[m.name] = {"uri": o.record["path"], "source": source}
    return _fingerprinted([m for m in adapted if m.name in made], zoo, rec, vocabs, made)


@dataclass(frozen=True)
class Similarities:
    """The raw-weight similarity records clustering reads, and the models of the groups
    whose similarity failed (each stays a cluster of its own)."""

    keys: list[str]
    failed: list[ModelRef] = field(default_factory=list)


def similarity(models: list[ModelRef], cfg: RunConfig, rec: StageRunner) -> Similarities:
    """Raw-weight similarity over each architecture group, and task-vector cosine inside
    each declared base family. A group whose similarity fails leaves its models as they
    are (the failure is recorded; the rest of the recipe runs)."""
    sc = cfg.similarity
    groups = list(sc.groups)
    # sketched values near the clustering threshold are computed exactly
    how = {"exact": sc.exact, "metric": sc.metric, "threshold": sc.threshold}
    by_arch: dict[str, list[ModelRef]] = defaultdict(list)
    for m in models:
        by_arch[m.arch_signature or ""].append(m)
    calls, raw = [], {}
    for arch, members in sorted(by_arch.items()):
        if len(members) < 2:
            continue
        raw[len(calls)] = members
        label = f"arch {arch[:8]} ({len(members)} models)"
        calls.append(
            call(compute_similarity, label, models=by_fingerprint(members), groups=groups, **how)
        )
        for base, tunes in _base_families(members, cfg):
            label = f"task vectors of {len(tunes)} fine-tunes of {base.name}"
            family = by_fingerprint([base, *tunes])
            calls.append(
                call(
                    compute_similarity,
                    label,
                    models=family,
                    groups=groups,
                    base=base,
                    exact=sc.exact,
                )
            )
    outcomes = [rec.run(c) for c in calls]
    keys, failed = [], []
    for i, (c, o) in enumerate(zip(calls, outcomes, strict=True)):
        if o.record is not None:
            if i in raw:
                keys.append(o.record["key"])
        elif o.status != "failed":  # a plan: not computed yet, clustering waits on it
            raise RunFailed(f"similarity {c.label} has no result")
        elif i in raw:
            failed += raw[i]
            names = ", ".join(m.name for m in raw[i])
            rec.say(f"similarity {c.label} failed: {names} stay unclustered", "yellow")
    return Similarities(keys, failed)


def cluster(
    models: list[ModelRef], sims: Similarities, cfg: RunConfig, rec: StageRunner
) -> list[list[ModelRef]]:
    """Complete-linkage clusters inside each architecture group, at the (auto) threshold;
    the models of a group whose similarity failed are clusters of one."""
    sc = cfg.similarity
    alone = {m.fingerprint for m in sims.failed}
    measured = [m for m in models if m.fingerprint not in alone]
    singletons = [[m] for m in models if m.fingerprint in alone]
    if not measured:
        return singletons
    o = rec.run(
        call(
            cluster_zoo,
            f"threshold {sc.threshold} on {sc.metric}",
            models=by_fingerprint(measured),
            similarity_keys=sims.keys,
            metric=sc.metric,
            threshold=sc.threshold,
            # the zoo's families inform only the automatic threshold
            related=_related_pairs(measured, cfg) if sc.threshold == "auto" else [],
        )
    )
    if o.record is None:
        if o.status != "failed":
            raise RunFailed("clustering has no result")
        rec.say("clustering failed: every model stays a cluster of its own", "yellow")
        return [[m] for m in models]
    by_fp = {m.fingerprint: m for m in models}
    found = [[by_fp[m["fingerprint"]] for m in c["members"]] for c in o.record["clusters"]]
    return found + singletons


def mergeable(clusters: list[list[ModelRef]], cfg: RunConfig, rec: StageRunner) -> list[Cluster]:
    """The clusters of two or more models, with their base for task-vector methods."""
    out = []
    for index, members in enumerate(clusters):
        if len(members) < 2:
            continue
        anchor = _anchor(members, cfg)
        base = None
        rule = METHODS[cfg.merge.method].base
        if rule != "none":  # task vectors: the declared base (if any, for "optional")
            base = next((m for m in members if m.name == anchor), None)
            if base is None and rule == "required":
                why = f"{cfg.merge.method} needs a base; no declared base in it"
                rec.failures.append(Failure("merge", f"cluster of {anchor}", why, True))
                rec.say(f"merge cluster of {anchor}: {why}", "red")
                continue
            members = [m for m in members if m is not base]
        accepted = [{**m.to_dict(), "params": {}} for m in members]
        out.append(Cluster(index, anchor, members, base, accepted))
    return out


def search(clusters: list[Cluster], cfg: RunConfig, rec: StageRunner) -> list[Cluster]:
    """Selective merging: each cluster's search keeps the members (and coefficients) that
    raise its proxy score. Clusters whose search failed are dropped (the run fails)."""
    fc = cfg.filter
    todo = [c for c in clusters if fc.spec.search is not None and len(c.members) > 1]
    tasks = list(fc.proxy_tasks or cfg.evaluation.tasks)
    calls = [
        call(
            filter_cluster,
            f"{fc.strategy} search in cluster of {c.anchor} ({len(c.members)} candidates)",
            anchor=c.anchor,
            members=by_fingerprint(c.members),
            base=c.base,
            method=cfg.merge.method,
            params=dict(cfg.merge.params),
            tokenizer=cfg.merge.tokenizer,
            settings=fc.search_settings(),
            proxy_tasks=tasks,
            proxy_limit=fc.proxy_limit,
            include_paths=list(cfg.evaluation.include_paths),
            proxy_metric=cfg.metrics_for(tasks),
            batch_size=cfg.evaluation.batch_size,
            allow_code_execution=cfg.evaluation.allow_code_execution,
            **placement(cfg, c.members[0].dtype),
        )
        for c in todo
    ]
    found = dict(zip([c.index for c in todo], run_all(rec, calls), strict=True))
    out = []
    for c in clusters:
        if c.index not in found:
            out.append(c)
        elif (r := found[c.index].record) is not None:
            by_name = {m.name: m for m in c.members}
            accepted = [
                {**by_name[a["name"]].to_dict(), "params": a["params"]} for a in r["accepted"]
            ]
            out.append(replace(c, accepted=accepted))
        else:
            rec.waits("merge", f"cluster of {c.anchor}", f"filter of cluster {c.anchor}")
    return out


def merge(clusters: list[Cluster], cfg: RunConfig, rec: StageRunner) -> dict[int, ModelRef]:
    """The merged model of each cluster (by index) that kept two or more members, or any
    on a base; a cluster whose search kept one member and no base is not merged."""
    todo = [c for c in clusters if len(c.accepted) > 1 or (c.accepted and c.base is not None)]
    strategy = f"-{cfg.filter.strategy}" if cfg.filter.spec.search is not None else ""
    calls = []
    for c in todo:
        label = f"merge-{c.anchor}-{cfg.merge.method}{strategy}"
        calls.append(
            call(
                merge_cluster,
                label,
                label=label,
                members=c.accepted,
                method=cfg.merge.method,
                params=dict(cfg.merge.params),
                dtype=cfg.merge.dtype,
                base=c.base,
                tokenizer=cfg.merge.tokenizer,
            )
        )
    merged = {}
    for c, mc, o in zip(todo, calls, run_all(rec, calls), strict=True):
        if (r := o.record) is not None:
            dtype = cfg.merge.dtype or c.members[0].dtype
            merged[c.index] = ModelRef(
                mc.label, r["path"], r["fingerprint"], r["artifact_id"], "merged", dtype
            )
    return merged


def experts_of(
    clusters: list[list[ModelRef]], searched: list[Cluster], merged: dict[int, ModelRef]
) -> list[ModelRef]:
    """One model per cluster: its merged model, else the member that stands alone (a
    singleton, or the one member its search kept). A cluster whose search or merge failed
    (or could not run) leaves its members as they are: each stands for itself."""
    kept = {c.index: c for c in searched}
    out = []
    for i, members in enumerate(clusters):
        if i in merged:
            out.append(merged[i])
        elif len(members) == 1:
            out.append(members[0])
        elif i in kept and len(kept[i].accepted) == 1 and kept[i].base is None:
            (only,) = kept[i].accepted
            out.append(next(m for m in members if m.name == only["name"]))
        else:
            out.extend(members)
    return out


def evaluate(
    models: list[ModelRef], cfg: RunConfig, rec: StageRunner, split: str = "test"
) -> dict[str, Outcome]:
    """Each model on the evaluation tasks: ``test`` for the leaderboard (``evaluation.limit``
    documents), ``proxy`` for selection (``filter.proxy_limit``)."""
    ev = cfg.evaluation
    proxy = split == "proxy"
    calls = [
        call(
            evaluate_model,
            f"{m.name} (proxy)" if proxy else m.name,
            model=m,
            tasks=list(ev.tasks),
            limit=cfg.filter.proxy_limit if proxy else ev.limit,
            batch_size=ev.batch_size,
            include_paths=list(ev.include_paths),
            backend=ev.backend,
            allow_code_execution=ev.allow_code_execution,
            split=split,
            **placement(cfg, m.dtype),
        )
        for m in models
    ]
    return {m.name: o for m, o in zip(models, run_all(rec, calls), strict=True)}


def candidates_of(experts: list[ModelRef], clusters: list[list[ModelRef]]) -> list[ModelRef]:
    """What a mixture may route to: each cluster's model (``experts``, from
    :func:`experts_of`), then every zoo model: the ones its search rejected (a skill the
    merge could not keep) and the ones it merged (a merge can lose a member's skill while
    raising the cluster's proxy mean)."""
    names = {m.name for m in experts}
    return experts + [m for c in clusters for m in c if m.name not in names]


@dataclass(frozen=True)
class Mixture:
    ref: ModelRef
    router_accuracy: list[dict]
    experts: list[str]


def mixture(
    experts: list[ModelRef],
    candidates: list[ModelRef],
    proxy: dict[str, Outcome],
    cfg: RunConfig,
    rec: StageRunner,
) -> Mixture | None:
    """The mixture (the paper's final recipe) of one model per cluster (``experts``), or,
    for model-level mixtures with ``mixture.select_experts``, of the ``candidates`` chosen
    by their proxy score; a ``linear`` router is fitted on the proxy labels. Everything
    here reads the proxy split, never the test split."""
    mc = cfg.mixture
    variant, router = mc.spec, ROUTERS[mc.router_used()]
    metric = cfg.metrics_for(list(cfg.evaluation.tasks))
    selection = variant.routes_samples and (mc.select_experts or router.fitted)
    pool = candidates if variant.routes_samples and mc.select_experts else experts
    scored = [c for c in pool if proxy.get(c.name) and proxy[c.name].record]
    means = means_of({c.name: proxy[c.name] for c in scored})
    labels = None
    if selection and len(scored) > 1:
        backbone = _best(scored, means)
        o = rec.run(
            call(
                select_experts,
                f"experts among {len(scored)} candidates",
                candidates=by_fingerprint(scored),
                proxy_keys={c.name: proxy[c.name].record["key"] for c in scored},
                backbone=backbone,
                layer=mc.layer,
                pooling=mc.pooling,
                metric=metric,
                max_experts=mc.max_experts,
                fixed=not mc.select_experts,
                **placement(cfg, backbone.dtype),
            )
        )
        if o.record is None:
            return None
        labels = o.record["key"]
        experts = [c for c in scored if c.name in o.record["selected"]]
    else:
        experts = scored
    experts = sorted(experts, key=lambda e: e.name)
    prompts = None
    if mc.prompts and router.needs_prompts:
        prompts = assign_prompts([e.name for e in experts], means, dict(mc.prompts))
        experts = [e for e in experts if e.name in prompts]
    if len(experts) < 2:
        best = experts[0].name if experts else "no model"
        rec.say(f"mixture skipped: {best} alone is the best expert set on the proxy split")
        return None
    label = f"mixture-{variant.name}-{router.name}"
    accuracy = variant.routes_samples and mc.router_accuracy
    backbone = _best(experts, means)
    # the experts' dtype, or float32 for variants that write their own weights (FFN-level
    # and hybrid MoE directories, block-level layers)
    stored = backbone.dtype if variant.in_expert_dtype else "F32"
    o = rec.run(
        call(
            mix_experts,
            label,
            experts=experts,
            backbone=backbone,
            settings=mc.model_dump(exclude={"prompts"}) | {"router": router.name},
            prompts=prompts or {},
            accuracy_tasks=list(cfg.evaluation.tasks) if accuracy else [],
            accuracy_limit=cfg.evaluation.limit,
            include_paths=list(cfg.evaluation.include_paths),
            accuracy_metric=metric,
            labels=labels,
            batch_size=cfg.evaluation.batch_size,
            **placement(cfg, stored),
        )
    )
    if o.record is None:
        return None
    r = o.record
    # variants with their own model class evaluate through model-glue's lm-eval model
    loader = "mixture" if variant.own_model_class else None
    ref = ModelRef(
        label, r["path"], r["fingerprint"], r["artifact_id"], "mixture",
        dtype=stored, loader=loader,
    )  # fmt: skip
    return Mixture(ref, r["router_accuracy"], [e.name for e in experts])


def final(
    models: list[ModelRef], proxy: dict[str, Outcome], cfg: RunConfig, rec: StageRunner
) -> dict | None:
    """The run's output: the best of every zoo model, merged model and mixture on the proxy
    split (never below the best single model there). Returns the choice's record."""
    scored = [m for m in models if proxy.get(m.name) and proxy[m.name].record]
    if not scored:
        return None
    o = rec.run(
        call(
            choose_final,
            f"best of {len(scored)} models on the proxy split",
            candidates=scored,
            proxy_keys={m.name: proxy[m.name].record["key"] for m in scored},
            metric=cfg.metrics_for(list(cfg.evaluation.tasks)),
        )
    )
    return o.record


def means_of(outcomes: dict[str, Outcome]) -> Scores:
    """The mean value per task of each evaluated model."""
    out: Scores = {}
    for name, o in outcomes.items():
        if o.record is not None:
            per_task: dict[str, list[float]] = defaultdict(list)
            for s in o.record["scores"]:
                per_task[s["task"]].append(s["value"])
            out[name] = {t: sum(v) / len(v) for t, v in per_task.items()}
    return out


def _best(models: list[ModelRef], means: Scores) -> ModelRef:
    """The model with the highest proxy mean (the mixture's router backbone)."""
    return max(models, key=lambda m: (sum(means.get(m.name, {}).values()), m.name))


def run_all(rec: StageRunner, calls: list) -> list[Outcome]:
    """Independent stage calls: all at once on a Dask runner (worker processes), one after
    the other on the flow's threads (lm-eval seeds global RNGs: threads would interleave)."""
    from prefect.context import FlowRunContext

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    if type(runner).__name__ == "DaskTaskRunner":
        return rec.run_many(calls)
    return [rec.run(c) for c in calls]


def placement(cfg: RunConfig, stored: str | None) -> dict:
    """The device and the resolved evaluation dtype (what cache keys hold) for a model
    stored in ``stored``: evaluations, search trials, router features and mixtures."""
    ev = cfg.evaluation
    device = resolve_device(ev.device)
    return {"device": device, "dtype": dtype_label(resolve_dtype(ev.dtype, device, stored))}


def _base_families(
    members: list[ModelRef], cfg: RunConfig
) -> list[tuple[ModelRef, list[ModelRef]]]:
    """(base, its fine-tunes) for each declared base in ``members`` with 2+ fine-tunes."""
    declared = {z.name: z.base for z in cfg.zoo}
    by_name = {m.name: m for m in members}
    out = []
    for base_name in sorted({declared.get(n) for n in by_name} - {None}):
        tunes = [m for n, m in sorted(by_name.items()) if declared.get(n) == base_name]
        if base_name in by_name and len(tunes) >= 2:
            out.append((by_name[base_name], tunes))
    return out


def _related_pairs(models: list[ModelRef], cfg: RunConfig) -> list[list[str]]:
    """Fingerprint pairs that declared ``base:`` relations put in one family: each fine-tune
    with its base, and fine-tunes of one base with each other."""
    fp = {m.name: m.fingerprint for m in models}
    family: dict[str, list[str]] = defaultdict(list)
    for z in cfg.zoo:
        if z.base is not None and z.name in fp:
            family[z.base].append(fp[z.name])
    pairs = set()
    for base, tunes in family.items():
        members = tunes + ([fp[base]] if base in fp else [])
        pairs |= {tuple(sorted((a, b))) for a in members for b in members if a != b}
    return [list(p) for p in sorted(pairs)]


def _anchor(members: list[ModelRef], cfg: RunConfig) -> str:
    """A readable name for a cluster: its declared common base if any, else its first member."""
    names = {m.name for m in members}
    bases = sorted({z.base for z in cfg.zoo if z.name in names and z.base in names})
    return bases[0] if bases else sorted(names)[0]
