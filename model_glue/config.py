"""The one YAML file a user writes to configure a run, validated once with clear errors.

Errors name the file, the key path (``merge.method``) and, where it helps, the allowed
values, e.g. ``glue.yaml: similarity.treshold: unknown key (allowed: groups, threshold)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_glue.errors import InputError


class ConfigError(InputError):
    """A run configuration file is missing, malformed or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)]


class ZooModel(_Strict):
    name: Name
    path: str  # local directory or fsspec URL; relative paths are relative to the config file
    base: str | None = None  # the zoo model this one was fine-tuned from, if known


class SimilarityConfig(_Strict):
    groups: list[Literal["attn", "mlp", "embed"]] = Field(default=["attn", "mlp"], alias="tensors")
    metric: Literal["sim_all", "sim_attn", "sim_mlp", "flat_cosine"] = "sim_all"
    # "auto": the widest gap in each architecture group's measured similarities (see
    # model_glue.clustering.auto_threshold); a number is used as is (the paper: 0.95)
    threshold: float | Literal["auto"] = "auto"

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


class FilterSettings(_Strict):
    """Selective merging inside each cluster (``strategy: none`` merges every member)."""

    strategy: Literal["none", "average", "coefficient", "similarity", "evolutionary"] = "none"
    proxy_tasks: list[str] | None = None  # default: the evaluation tasks
    # a preset's tasks as the proxy (model-glue-paper-tiny: tinyBenchmarks), with its metrics
    proxy_preset: Literal["model-glue-paper", "model-glue-paper-tiny"] | None = None
    # the metric a proxy task is scored on, for tasks that report several: one name for
    # every task or one per task (default: evaluation.metrics, else the task's only metric;
    # a task with several and none chosen fails the search)
    proxy_metric: str | dict[str, str] | None = None

    @model_validator(mode="after")
    def _expand_preset(self) -> FilterSettings:
        if self.proxy_preset is None:
            return self
        from model_glue.presets import preset_tasks

        metrics = preset_tasks(self.proxy_preset)
        chosen = self.proxy_metric if isinstance(self.proxy_metric, dict) else {}
        return self.model_copy(
            update={
                "proxy_tasks": list(dict.fromkeys([*metrics, *(self.proxy_tasks or [])])),
                "proxy_metric": self.proxy_metric
                if isinstance(self.proxy_metric, str)
                else metrics | chosen,
            }
        )

    proxy_limit: int | None = Field(
        default=100, gt=0
    )  # documents per proxy task and trial (paper: ~100)
    min_gain: float = Field(
        default=0.0, ge=0.0
    )  # greedy: a candidate must raise the proxy by this much (paper: 0)
    grid: list[float] = Field(default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], min_length=1)
    budget: int = Field(default=200, gt=0)  # CMA-ES proxy evaluations
    sigma0: float = Field(default=1 / 6, gt=0)
    seed: int = 42
    layer_groups: int = Field(default=0, ge=0)  # 0: one weight per model
    search_density: bool = False  # also search per-model densities (TIES/DARE)

    def search_settings(self) -> dict:
        """What the search itself depends on (its cache key), per strategy."""
        if self.strategy == "evolutionary":
            keys = ("budget", "sigma0", "seed", "layer_groups", "search_density")
        else:
            keys = ("grid", "min_gain")
        return {"strategy": self.strategy} | {k: getattr(self, k) for k in keys}


class MixtureSettings(_Strict):
    """The final mixture over the clusters' models (``variant: none`` skips it).

    ``model_level``: one expert model per sample; ``block_level``: decoder layers as
    experts; ``ffn_moe``: a Mixtral directory with the experts' MLPs; ``hybrid``: the first
    ``hybrid_k`` layers of the experts' average kept dense, the rest FFN-level. The last
    three need experts of one architecture."""

    variant: Literal["model_level", "block_level", "ffn_moe", "hybrid", "none"] = "model_level"
    hybrid_k: int = Field(default=0, ge=0)  # hybrid: dense (merged) layers at the bottom
    top_k: int | None = Field(default=None, ge=1)  # ffn_moe / hybrid: experts per token
    # linear: fitted on the proxy split (which expert answers which document; model_level
    # only, the default there); hidden, cheap_embed: the paper's training-free routers on
    # example prompts; random. Default: linear for model_level, hidden otherwise.
    router: Literal["linear", "hidden", "cheap_embed", "random"] | None = None
    # model_level: choose the experts greedily by the mixture's proxy score among every
    # cluster's model, every model filtering rejected and every singleton (false: one
    # expert per cluster, as the paper)
    select_experts: bool = True
    max_experts: int | None = Field(default=None, ge=2)
    layer: int = Field(default=1, ge=0)  # the backbone layer whose input the router reads
    # how a prompt's hidden states become one routing vector (default: last for
    # model_level, mean for block_level; block_level allows mean and first)
    pooling: Literal["last", "mean", "first"] | None = None
    # task name -> example inputs of that task (never test items); each task's prompts go
    # to the expert that scores best on it, the other tasks' prompts are its negatives
    prompts: dict[str, list[str]] = Field(default_factory=dict)
    router_accuracy: bool = True  # model_level: measure it on the evaluation tasks

    @model_validator(mode="after")
    def _hybrid_needs_k(self) -> MixtureSettings:
        if self.variant == "hybrid" and self.hybrid_k < 1:
            raise ValueError("hybrid_k: the hybrid variant needs hybrid_k >= 1 dense layers")
        if self.router == "linear" and self.variant not in ("model_level", "none"):
            raise ValueError(
                f"router: linear is fitted for model_level mixtures; {self.variant} takes "
                "hidden, cheap_embed or random"
            )
        allowed = {"block_level": ("mean", "first"), "model_level": ("last", "mean")}
        if self.pooling is not None and self.pooling not in allowed.get(
            self.variant, (self.pooling,)
        ):
            raise ValueError(
                f"pooling: {self.pooling!r} is not allowed for {self.variant} "
                f"(allowed: {', '.join(allowed[self.variant])})"
            )
        return self

    @property
    def router_used(self) -> str:
        return self.router or ("linear" if self.variant == "model_level" else "hidden")

    @property
    def pooling_used(self) -> str:
        return self.pooling or ("mean" if self.variant == "block_level" else "last")


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
    zoo: list[ZooModel] = Field(min_length=1)
    similarity: SimilarityConfig = SimilarityConfig()
    filter: FilterSettings = FilterSettings()
    merge: MergeSettings = MergeSettings()
    mixture: MixtureSettings = MixtureSettings(variant="none")
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
        if self.mixture.variant != "none" and self.mixture.router_used not in ("random", "linear"):
            if not self.mixture.prompts:
                raise ValueError(
                    f"mixture.prompts: the {self.mixture.router_used!r} router needs example prompts per task"
                )
            unknown = set(self.mixture.prompts) - set(self.evaluation.tasks)
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

    @field_validator("merge")
    @classmethod
    def _known_method(cls, merge: MergeSettings) -> MergeSettings:
        from model_glue.merge import METHODS

        if merge.method not in METHODS:
            raise ValueError(
                f"unknown merge method {merge.method!r} (allowed: {', '.join(sorted(METHODS))})"
            )
        return merge


def _format_error(source: str, err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, e["loc"][:-1])
            allowed = (
                ", ".join(sorted(f.alias or n for n, f in parent.model_fields.items()))
                if parent
                else ""
            )
            lines.append(
                f"{source}: {loc}: unknown key" + (f" (allowed: {allowed})" if allowed else "")
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {msg}" if loc == "<root>" else f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        current = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), ann
        )
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


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
            "zoo": [m.model_copy(update={"path": resolve_path(m.path, base_dir)}) for m in cfg.zoo],
            "store": None if cfg.store is None else resolve_path(cfg.store, base_dir),
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
    """FFN-level and hybrid mixtures are written as the MoE model of their experts' family,
    block-level ones from Llama layers: a zoo model of another family is a
    :class:`ConfigError` before any stage runs (its ``config.json`` is all that is read;
    an unreadable one is left to fingerprinting to report)."""
    import json

    import fsspec

    from model_glue.architectures.catalog import mixture_refusal

    variant = cfg.mixture.variant
    if variant not in ("ffn_moe", "hybrid", "block_level"):
        return
    for m in cfg.zoo:
        try:
            with fsspec.open(m.path.rstrip("/") + "/config.json", "r") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if why := mixture_refusal(config, variant):
            raise ConfigError(
                f"{source}: mixture.variant: {variant}: zoo model {m.name!r}: {why} "
                "(model_level mixes any architectures)"
            )
