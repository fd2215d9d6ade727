"""The zoo as the config gives it, turned into model directories the stages read.

A zoo entry is a directory (``path``) or a hub repo (``repo`` at ``revision``); the run
config may also ask the hub for the fine-tunes of a base (``zoo_from``). This step:

- expands discovery into entries (``discover`` stage: the list a run used is recorded per
  flow run, and ``glue plan`` names the newcomers as new models);
- resolves hub entries into the huggingface_hub cache (a run downloads what the cache
  lacks; ``glue plan`` only asks the hub which commit a branch is at, and downloads
  nothing); a repo that is missing or refused is one line, and the model is left out;
- leaves adapters (PEFT LoRA directories) to :func:`flows.steps.fingerprint`, which
  applies them to their base once the base is fingerprinted.

Tokens come from huggingface_hub's usual places (``HF_TOKEN``, ``huggingface-cli
login``) and are never passed to a stage, so they never reach a key, a record or a log.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from flows._recorder import Failure, StageRunner
from model_glue.config import RunConfig, ZooModel
from model_glue.errors import InputError
from tasks.discover import discover_models
from tasks.stage import call


@dataclass(frozen=True)
class Source:
    """Where a zoo model's files are, and where they came from: ``hub`` holds repo,
    revision, commit and the hub's per-file sha256 (None: a local directory)."""

    path: str | None
    hub: dict | None = None


@dataclass
class Zoo:
    """The resolved zoo: the config with every entry (discovered ones included), and
    where each entry's files are."""

    cfg: RunConfig
    sources: dict[str, Source] = field(default_factory=dict)


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def entry_name(repo: str) -> str:
    """A zoo name for a discovered repo: ``org/model`` -> ``org--model``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", repo.replace("/", "--"))[:128]


def resolve_zoo(cfg: RunConfig, rec: StageRunner) -> Zoo:
    cfg = _with_discovered(cfg, rec)
    sources: dict[str, Source] = {}
    for m in cfg.zoo:
        if m.repo is None:
            sources[m.name] = Source(m.path)
            continue
        try:
            sources[m.name] = _hub_source(m, cfg, planning=rec.flow_run_id is None)
        except InputError as e:
            why = " ".join(str(e).split())
            rec.say(f"left out {m.name}: {why}", "yellow")
            rec.failures.append(Failure("fingerprint", m.name, why, True))
    return Zoo(cfg, sources)


def _hub_source(m: ZooModel, cfg: RunConfig, *, planning: bool) -> Source:
    from model_glue import hub

    revision = m.revision or "main"
    # planning: no download, what the hub says the revision holds now
    find = hub.lookup if planning else hub.resolve
    info = find(
        m.repo,
        revision,
        cache_dir=cfg.hub_cache,
        allow_pickle=cfg.allow_pickle,
        endpoint=_endpoint(),
    )
    pin = {"repo": m.repo, "revision": revision, "commit": info.commit, "files": info.files}
    return Source(str(info.path), pin)


def _with_discovered(cfg: RunConfig, rec: StageRunner) -> RunConfig:
    """The config with the hub's fine-tunes of each ``zoo_from`` base added (repos already
    in the zoo are not added twice); each is a fine-tune of the zoo model that is the
    queried base, when there is one."""
    if not cfg.zoo_from:
        return cfg
    from model_glue import hub

    zoo = list(cfg.zoo)
    have_repo = {m.repo for m in zoo if m.repo}
    have_name = {m.name for m in zoo}
    for q in cfg.zoo_from:
        query = q.model_dump(exclude_none=True)
        try:
            repos = hub.discover(**query, endpoint=_endpoint())
        except InputError as e:  # offline, or the hub does not answer: the named zoo runs
            why = " ".join(str(e).split())
            rec.say(f"zoo_from {q.base_model} skipped: {why}", "yellow")
            if rec.flow_run_id is None:  # a plan: its table says so (a run goes on, said)
                rec.failures.append(Failure("discover", q.base_model, f"skipped: {why}", True))
            continue
        o = rec.run(call(discover_models, q.base_model, query=query, repos=repos))
        listed = (o.record or {}).get("repos", repos)
        base = next((m.name for m in zoo if m.repo == q.base_model), None)
        for repo in listed:
            name = entry_name(repo)
            if repo in have_repo or name in have_name:
                continue
            zoo.append(ZooModel(name=name, repo=repo, base=base))
            have_repo.add(repo)
            have_name.add(name)
        rec.say(f"zoo_from {q.base_model}: {len(listed)} repos on the hub")
    return cfg.model_copy(update={"zoo": zoo})
