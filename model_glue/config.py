"""The one YAML file a user writes to configure a run, validated once with clear errors.

Errors name the file, the key path (``merge.method``) and, where it helps, the allowed
values, e.g. ``glue.yaml: similarity.treshold: unknown key (allowed: groups, threshold)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from model_glue.errors import InputError
from model_glue.mixture.routers.base import ROUTERS
from model_glue.mixture.variants import VARIANTS, VariantSettings
from model_glue.registry import Registry
from model_glue.search.strategies import STRATEGIES


class ConfigError(InputError):
    """A run configuration file is missing, malformed or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)]


Repo = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")]


class ZooModel(_Strict):
    """One zoo model: a directory (``path``) or a hub repo (``repo``, at ``revision``).
    Either may hold a full checkpoint or a PEFT LoRA adapter, applied to ``base``."""

    name: Name
    path: str | None = None  # local directory or fsspec URL; relative: to the config file
    repo: Repo | None = None  # org/model on the Hugging Face Hub
    revision: str | None = None  # a branch, tag or commit of ``repo`` (default: main)
    base: str | None = None  # the zoo model this one was fine-tuned from, if known

    @model_validator(mode="after")
    def _one_source(self) -> ZooModel:
        if (self.path is None) == (self.repo is None):
            raise ValueError(f"zoo model {self.name!r}: give either path or repo")
        if self.revision is not None and self.repo is None:
            raise ValueError(f"zoo model {self.name!r}: revision needs repo")
        return self


class ZooFrom(_Strict):
    """Discovery: the hub's fine-tunes, adapters and merges of ``base_model`` (its model
    tree), most downloaded (or ``sort``) first, joined to the zoo on every run."""

    base_model: Repo
    limit: int = Field(default=50, ge=1, le=1000)
    sort: Literal["downloads", "likes", "created_at", "last_modified", "trending_score"] = (
        "downloads"
    )
    author: str | None = None
    search: str | None = None


class SimilarityConfig(_Strict):
    groups: list[Literal["attn", "mlp", "embed"]] = Field(default=["attn", "mlp"], alias="tensors")
    metric: Literal["sim_all", "sim_attn", "sim_mlp", "flat_cosine"] = "sim_all"
    # "auto": the widest gap in each architecture group's measured similarities (see
    # model_glue.clustering.auto_threshold); a number is used as is (the paper: 0.95)
    threshold: float | Literal["auto"] = "auto"
    # true: every pair from the checkpoints themselves (the paper's numbers to the last
    # digit); false: from the sketches fingerprinting made, pairs near the threshold exact
    exact: bool = False

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            raise ValueError(f"must be a number in [0, 1] or 'auto', got {v!r}")
        return float(v)


class MergeSettings(_Strict):
    method: str = "linear"
    params: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    # the merged vocabulary: union (every member's tokens), base (the base's, else the
    # first member's) or a zoo model's name; mergekit's tokenizer_source semantics
    tokenizer: str = "union"

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from model_glue.merge import METHODS

        if method not in METHODS:
            raise ValueError(
                f"unknown merge method {method!r} (allowed: {', '.join(sorted(METHODS))})"
            )
        return method

    @model_validator(mode="after")
    def _declared_params(self) -> MergeSettings:
        """Every parameter and value checked against the method's declarations (the same
        check ``glue merge`` makes), with the key that holds it."""
        from model_glue.merge import METHODS
        from model_glue.merge.params import MergeConfigError, check_setting
        from model_glue.merge.spec import dtype_name

        method = METHODS[self.method]
        for key, setting in self.params.items():
            try:
                param = method.param(key)
            except MergeConfigError as e:
                raise ValueError(f"params.{key}: {e}") from None
            try:
                check_setting(param, setting, f"params.{key}")
            except MergeConfigError as e:
                raise ValueError(str(e)) from None
        try:
            dtype_name(self.dtype)
        except MergeConfigError as e:
            raise ValueError(f"dtype: {e}") from None
        return self


def _tagged(registry: Registry, tag: str, default: str, *extra: type[BaseModel]) -> Any:
    """A section validated by the settings model of the entry its ``tag`` key names
    (``default`` when the key is absent): a pydantic discriminated union built from a
    registry, so that a key of another entry is an unknown key."""
    members = tuple(e.settings for e in registry) + extra

    def fill(v: Any) -> Any:
        return {tag: default, **v} if isinstance(v, dict) and tag not in v else v

    return Annotated[Union[members], Field(discriminator=tag), BeforeValidator(fill)]  # noqa: UP007


# ``filter``: selective merging inside each cluster, one settings model per strategy
# (model_glue/search/strategies); ``strategy: none`` merges every member.
FilterSettings = _tagged(STRATEGIES, "strategy", "none")


class NoMixture(_Strict):
    """``mixture: {variant: none}``: no mixture; the final model is the best merged or
    zoo model."""

    variant: Literal["none"]


# ``mixture``: the final mixture over the clusters' models, one settings model per variant
# (model_glue/mixture/variants; ``glue mix`` files use the same models).
MixtureSettings = _tagged(VARIANTS, "variant", "model_level", NoMixture)


class EvaluationConfig(_Strict):
    # lm-eval task names (a preset adds its own before these)
    tasks: list[str] = Field(default_factory=list)
    preset: Literal["model-glue-paper", "model-glue-paper-tiny"] | None = None
    # the metric that stands for a task where it reports several (filled by the preset)
    metrics: dict[str, str] = Field(default_factory=dict)
    # lm-eval's opt-in for tasks that execute the model's code (MBPP, HumanEval)
    allow_code_execution: bool = False
    limit: int | None = Field(default=None, gt=0)
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = 32  # auto: lm-eval's search
    # where models are evaluated (evaluation, the search's proxy): auto = CUDA when torch
    # sees a GPU; dtype auto = the checkpoint's on a GPU, float32 on a CPU
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # full evaluations of model directories through lm-eval's vllm model (pip install
    # 'model-glue[vllm]'); mixtures and the search always use hf
    backend: Literal["hf", "vllm"] = "hf"

    @model_validator(mode="after")
    def _expand_preset(self) -> EvaluationConfig:
        ev = self
        if ev.preset is not None:
            from model_glue.presets import preset_tasks

            metrics = preset_tasks(ev.preset)
            ev = ev.model_copy(
                update={
                    "tasks": list(dict.fromkeys([*metrics, *ev.tasks])),
                    "metrics": metrics | ev.metrics,
                }
            )
        if not ev.tasks:
            raise ValueError("tasks: give at least one lm-eval task, or a preset")
        return ev

    # folders of lm-eval task files (relative to the config file); every stage that runs
    # lm-eval sees them (evaluation, the search's proxy, the mixture's router accuracy)
    include_paths: list[str] = Field(default_factory=list)


class RunnerSettings(_Strict):
    """Where the stages run: threads of the flow process (default), or a Dask cluster:
    an existing one at ``address``, or a local one of ``n_workers`` processes."""

    kind: Literal["threads", "dask"] = "threads"
    address: str | None = None  # tcp://scheduler:8786
    n_workers: int = Field(default=2, ge=1)  # a local cluster (no address)
    threads_per_worker: int = Field(default=1, ge=1)
    gpus_per_worker: int = Field(default=0, ge=0)  # a local cluster's GPU resource


class RunConfig(_Strict):
    name: Name = "run"
    store: str | None = None  # fsspec URL of the artifact store (default: <GLUE_HOME>/store)
    lineage_db: str | None = None  # DuckDB file (default: <GLUE_HOME>/lineage.duckdb)
    zoo: list[ZooModel] = Field(default_factory=list)
    # discovery: the hub's fine-tunes of a base, added to the zoo (one query or a list)
    zoo_from: list[ZooFrom] = Field(default_factory=list)
    # where hub models are downloaded (default: huggingface_hub's cache, HF_HOME)
    hub_cache: str | None = None
    # pickles run code when loaded: true lets a LoRA adapter be read from adapter_model.bin
    # and a hub repo's pickled weights be downloaded (full checkpoints are read from
    # safetensors only: convert them); off: refused in one line
    allow_pickle: bool = False
    similarity: SimilarityConfig = SimilarityConfig()
    filter: FilterSettings = Field(
        default_factory=lambda: STRATEGIES["none"].settings(strategy="none")
    )
    merge: MergeSettings = MergeSettings()
    mixture: MixtureSettings = Field(default_factory=lambda: NoMixture(variant="none"))
    evaluation: EvaluationConfig
    runner: RunnerSettings = RunnerSettings()
    # a zoo model that cannot be read (missing, truncated, pickle-only, ...): "skip" leaves it
    # out and says so (the run can still succeed); "fail" fails the run after the rest ran
    on_model_error: Literal["skip", "fail"] = "skip"
    # a zoo model with NaN or Inf weights is left out like an unreadable one, unless this
    # keeps it (with a warning; its NaN similarities never link it to a cluster)
    allow_nonfinite: bool = False

    @model_validator(mode="after")
    def _code_execution_opt_in(self) -> RunConfig:
        from model_glue.presets import CODE_TASKS

        code = [t for t in self.task_names if t in CODE_TASKS]
        if code and not self.evaluation.allow_code_execution:
            raise ValueError(
                f"{', '.join(code)} execute the model's generated code: set "
                "evaluation.allow_code_execution: true to run them (lm-eval's own opt-in)"
            )
        return self

    def metrics_for(self, tasks: list[str]) -> str | dict[str, str] | None:
        """The metric that selection reads on each of ``tasks`` (proxy trials, router
        accuracy): filter.proxy_metric, else evaluation.metrics; None: the task's only one."""
        fc, ev = self.filter, self.evaluation
        if isinstance(fc.proxy_metric, str):
            return fc.proxy_metric
        merged = {t: m for t, m in (ev.metrics | (fc.proxy_metric or {})).items() if t in tasks}
        return merged or None

    @property
    def task_names(self) -> list[str]:
        """Every lm-eval task the run uses: evaluation and proxy tasks, in order, once."""
        return list(dict.fromkeys([*self.evaluation.tasks, *(self.filter.proxy_tasks or [])]))

    @field_validator("zoo_from", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _some_zoo(self) -> RunConfig:
        if not self.zoo and not self.zoo_from:
            raise ValueError("zoo: list at least one model (or discover some with zoo_from)")
        tok = self.merge.tokenizer
        if tok not in ("union", "base") and tok not in {m.name for m in self.zoo}:
            raise ValueError(f"merge.tokenizer: {tok!r} is not union, base or a zoo model's name")
        return self

    @field_validator("zoo")
    @classmethod
    def _unique_names(cls, zoo: list[ZooModel]) -> list[ZooModel]:
        seen: set[str] = set()
        for m in zoo:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} appears twice")
            seen.add(m.name)
        return zoo

    @model_validator(mode="after")
    def _bases_exist(self) -> RunConfig:
        names = {m.name for m in self.zoo}
        for m in self.zoo:
            if m.base is not None and m.base not in names:
                raise ValueError(f"zoo model {m.name!r}: base {m.base!r} is not a zoo model")
        mixture = self.mixture
        if isinstance(mixture, VariantSettings) and ROUTERS[mixture.router_used()].needs_prompts:
            if not mixture.prompts:
                raise ValueError(
                    f"mixture.prompts: the {mixture.router_used()!r} router needs example prompts per task"
                )
            if listed := [t for t, p in mixture.prompts.items() if not isinstance(p, list)]:
                raise ValueError(f"mixture.prompts.{listed[0]}: give a list of example inputs")
            unknown = set(mixture.prompts) - set(self.evaluation.tasks)
            if unknown:
                raise ValueError(
                    f"mixture.prompts: {sorted(unknown)} are not evaluation tasks (allowed: {', '.join(self.evaluation.tasks)})"
                )
        return self

    @field_validator("evaluation")
    @classmethod
    def _backend_installed(cls, ev: EvaluationConfig) -> EvaluationConfig:
        import importlib.util

        if ev.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "backend 'vllm' needs the vllm package: pip install 'model-glue[vllm]' "
                "(or use backend: hf)"
            )
        return ev

    @model_validator(mode="after")
    def _merge_params_given(self) -> RunConfig:
        """A parameter the method requires must be set, unless the search sets it."""
        from model_glue.merge import METHODS

        method = METHODS[self.merge.method]
        searched = {"density"} if getattr(self.filter, "search_density", False) else set()
        for p in method.params:
            if p.required and p.name not in self.merge.params and p.name not in searched:
                raise ValueError(
                    f"merge.params.{p.name}: merge method {method.name!r} requires it "
                    f"({p.describe()})"
                )
        return self

    @model_validator(mode="after")
    def _searchable_method(self) -> RunConfig:
        """A search sets per-model weights on any subset of a cluster: the method must
        take them (see MergeMethod.search_refusal)."""
        from model_glue.merge import METHODS

        method = METHODS[self.merge.method]
        if self.filter.spec.search is not None and method.search_refusal:
            raise ValueError(
                f"merge.method: {method.name!r} cannot be searched by filter.strategy "
                f"{self.filter.strategy!r}: {method.search_refusal} (use strategy 'none')"
            )
        return self


def _format_error(source: str, err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        parent, loc, chosen = _walk(model, e["loc"][:-1] if e["loc"] else ())
        last = [str(e["loc"][-1])] if e["loc"] else []
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key = ".".join([*loc, *last, e["ctx"]["discriminator"].strip("'")])
            tags = e["ctx"].get("expected_tags", "")
            lines.append(
                f"{source}: {key}: unknown value {e['ctx'].get('tag')!r} (allowed: {tags})"
            )
            continue
        if parent is not None and last and last[0] in _tags(parent):  # the member's own key
            parent, loc, chosen, last = (*_walk(model, e["loc"]), [])
        where = ".".join([*loc, *last]) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = (
                ", ".join(sorted(f.alias or n for n, f in parent.model_fields.items()))
                if isinstance(parent, type)
                else ""
            )
            of = f" of {chosen}" if chosen else ""
            lines.append(
                f"{source}: {where}: unknown key{of}"
                + (f" (allowed: {allowed})" if allowed else "")
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {msg}" if where == "<root>" else f"{source}: {where}: {msg}")
    return "\n".join(lines)


def _members(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (one, or a union's members)."""
    args = getattr(annotation, "__args__", ())
    if hasattr(annotation, "__metadata__"):  # Annotated[X, ...]
        return _members(args[0])
    return [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]


def _tag(model: type[BaseModel]) -> tuple[str, str] | None:
    """A union member's discriminator field and value (``variant``, ``ffn_moe``)."""
    for name in ("variant", "strategy"):
        f = model.model_fields.get(name)
        if f is not None and getattr(f.annotation, "__args__", None):
            return name, f.annotation.__args__[0]
    return None


def _tags(parent: Any) -> set[str]:
    return {t[1] for m in (parent if isinstance(parent, list) else []) if (t := _tag(m))}


def _walk(model: type[BaseModel], loc: tuple) -> tuple[Any, list[str], str]:
    """The model (or union members) at ``loc``, the location as the user wrote it (union
    tags left out) and the chosen member (``variant ffn_moe``)."""
    current: Any = model
    shown: list[str] = []
    chosen = ""
    for part in loc:
        if isinstance(current, list):  # a union: pydantic puts the member's tag in loc
            member = next((m for m in current if (t := _tag(m)) and t[1] == part), None)
            if member is not None:
                t = _tag(member)
                current, chosen = member, f"{t[0]} {t[1]}" if t else ""
                continue
            return None, [*shown, str(part)], chosen
        shown.append(str(part))
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None, shown, chosen
        field = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return None, shown, chosen
        members = _members(field.annotation)
        current = members[0] if len(members) == 1 else (members or None)
        chosen = ""
    return current, shown, chosen


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e, RunConfig)) from None
    if base_dir is not None:
        cfg = resolve_paths(cfg, base_dir)
    return cfg


def resolve_paths(cfg: RunConfig, base_dir: Path) -> RunConfig:
    """Every path of the run config, relative to ``base_dir`` (the config file's folder).

    The one place that knows which fields are paths: zoo models, the store and the lineage
    database, and the lm-eval task folders. URLs and absolute paths are kept as written;
    ``~`` is expanded.
    """
    ev = cfg.evaluation
    return cfg.model_copy(
        update={
            "zoo": [
                m
                if m.path is None
                else m.model_copy(update={"path": resolve_path(m.path, base_dir)})
                for m in cfg.zoo
            ],
            "store": None if cfg.store is None else resolve_path(cfg.store, base_dir),
            "hub_cache": None if cfg.hub_cache is None else resolve_path(cfg.hub_cache, base_dir),
            "lineage_db": None
            if cfg.lineage_db is None
            else resolve_path(cfg.lineage_db, base_dir),
            "evaluation": ev.model_copy(
                update={"include_paths": [resolve_path(p, base_dir) for p in ev.include_paths]}
            ),
        }
    )


def resolve_path(path: str, base_dir: Path) -> str:
    if "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    return parse_config(data, str(path), path.parent.resolve())


def validate_tasks(cfg: RunConfig, source: str = "<config>") -> None:
    """Every lm-eval task the run names exists, before any stage runs (imports lm-eval).

    Raises a :class:`ConfigError` naming the key, the task and the folders searched."""
    from model_glue.evaluate import TaskError, task_folders, unknown_tasks

    paths = list(cfg.evaluation.include_paths)
    try:
        unknown = set(unknown_tasks(cfg.task_names, paths))
    except TaskError as e:
        raise ConfigError(f"{source}: evaluation.include_paths: {e}") from None
    for key, names in (
        ("evaluation.tasks", cfg.evaluation.tasks),
        ("filter.proxy_tasks", cfg.filter.proxy_tasks or []),
    ):
        bad = [t for t in names if t in unknown]
        if bad:
            raise ConfigError(
                f"{source}: {key}: unknown lm-eval task {', '.join(repr(t) for t in bad)} "
                f"(searched {', '.join(task_folders(paths))} and lm-eval's built-in tasks)"
            )


def validate_mixture_families(cfg: RunConfig, source: str = "<config>") -> None:
    """A mixture variant that accepts only some architectures (FFN-level and hybrid: those
    with a MoE counterpart; block-level: Llama) refuses a zoo model of another family with a
    :class:`ConfigError` before any stage runs (its ``config.json`` is all that is read; an
    unreadable one is left to fingerprinting to report)."""
    import json

    import fsspec

    from model_glue.mixture.variants import refusal

    variant = cfg.mixture.variant
    if variant == "none" or VARIANTS[variant].refusal is None:
        return
    for m in cfg.zoo:
        if m.path is None:  # a hub model: checked once resolved, by its stage
            continue
        try:
            with fsspec.open(m.path.rstrip("/") + "/config.json", "r") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if why := refusal(variant, config):
            raise ConfigError(
                f"{source}: mixture.variant: {variant}: zoo model {m.name!r}: {why} "
                "(model_level mixes any architectures)"
            )
