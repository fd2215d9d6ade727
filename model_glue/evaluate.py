"""lm-evaluation-harness adapter: score a model on lm-eval tasks, in-process.

Every score of the pipeline (proxy scores during search, final benchmarks) goes through
:func:`evaluate`, so one place decides how models are loaded (safetensors only, no remote
code), which task folders are visible (the demo tasks always are), and how lm-eval's
nested result dict becomes flat :class:`Score` records with plain Python numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_glue.checkpoint import Checkpoint
from model_glue.errors import InputError
from model_glue.splits import Split, SplitTaskManager

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEMO_TASKS_DIR = Path(__file__).resolve().parent / "zoo" / "lm_tasks"
BOOTSTRAP_ITERS = 1000  # only metrics without a closed-form stderr bootstrap; `mean` does not
_QUIET_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate")


class TaskError(InputError):
    """An lm-eval task that cannot be found, or whose metric cannot be chosen."""


@dataclass(frozen=True)
class Score:
    """One metric of one task. ``metric`` carries lm-eval's filter name when it is not ``none``."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n_samples: int
    split: str | None = None  # the documents scored, e.g. "test" or "validation"


def evaluate(
    model: str | Path | PreTrainedModel | LM,
    tasks: list[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    limit: int | None = None,
    include_paths: list[str] | None = None,
    batch_size: int | str = 32,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    backend: str = "hf",
    allow_code_execution: bool = False,
    split: Split = "test",
) -> list[Score]:
    """Runs ``tasks`` on ``model`` with ``lm_eval.simple_evaluate``; one Score per (task, metric).
    See :func:`evaluate_samples` for the arguments; this drops the per-document values."""
    return evaluate_samples(
        model,
        tasks,
        tokenizer=tokenizer,
        limit=limit,
        include_paths=include_paths,
        batch_size=batch_size,
        seed=seed,
        device=device,
        dtype=dtype,
        backend=backend,
        allow_code_execution=allow_code_execution,
        split=split,
        log_samples=False,
    )[0]


def evaluate_samples(
    model: str | Path | PreTrainedModel | LM,
    tasks: list[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    limit: int | None = None,
    include_paths: list[str] | None = None,
    batch_size: int | str = 32,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    backend: str = "hf",
    allow_code_execution: bool = False,
    split: Split = "test",
    log_samples: bool = True,
) -> tuple[list[Score], list[dict]]:
    """Runs ``tasks`` on ``model``; returns the Scores and, with ``log_samples``, one row per
    document: ``task``, ``doc_id``, ``context`` (the text the model was given) and
    ``values`` (metric -> value).

    ``model`` is a local Hugging Face directory, an in-memory ``PreTrainedModel`` (with its
    ``tokenizer``; used by search trials so that no checkpoint is written), or a built lm-eval
    ``LM`` (mixtures). ``limit`` caps the documents per task. Greedy tasks give the same
    scores on every call; ``seed`` fixes lm-eval's samplers (few-shot, sampling tasks).
    A directory is loaded on ``device`` (``auto``, ``cpu``, ``cuda[:N]``) in ``dtype``
    (default: see :mod:`model_glue.devices`), through lm-eval's ``hf`` model or, with
    ``backend="vllm"``, its ``vllm`` model. ``batch_size`` may be ``"auto"``.
    ``allow_code_execution`` is lm-eval's opt-in for tasks that run generated code.
    ``split``: ``test`` (what a leaderboard reports) or ``proxy`` (what selection reads;
    never a test document, see :mod:`model_glue.splits`).
    """
    if not tasks:
        raise ValueError("evaluate: no tasks given")
    import lm_eval
    from lm_eval.api.model import LM

    manager = SplitTaskManager(manager_for(tasks, include_paths or ()), split)
    if isinstance(model, LM):
        lm = model
    elif backend == "vllm" and isinstance(model, str | Path):
        lm = _vllm_lm(model, batch_size, device, dtype)
    else:
        lm = _hf_lm(model, tokenizer, batch_size, device, dtype)
    with quiet_lm_eval(), code_execution(allow_code_execution):
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            confirm_run_unsafe_code=allow_code_execution,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=BOOTSTRAP_ITERS,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("evaluate: lm-eval returned no results")
    scores = [with_split(sc, results, manager.described) for sc in scores_from_results(results)]
    return scores, sample_rows(results) if log_samples else []


def with_split(score: Score, results: dict[str, Any], described: dict[str, str]) -> Score:
    """``score`` with the documents it was computed on (a group: its subtasks' splits)."""
    names = [score.task, *results.get("group_subtasks", {}).get(score.task, [])]
    splits = sorted({described[n] for n in names if n in described})
    return dataclasses.replace(score, split=", ".join(splits) or None)


def chosen_metric(
    task: str,
    available: Sequence[str],
    metric: str | Mapping[str, str] | None,
    purpose: str = "search on",
) -> str:
    """The metric a proxy task is judged on: ``metric`` (one name, or task -> name), else
    the task's only metric; anything else is a :class:`TaskError` saying what to set."""
    wanted = metric.get(task) if isinstance(metric, Mapping) else metric
    if wanted is not None and wanted in available:
        return wanted
    if wanted is None and len(available) == 1:
        return available[0]
    asked = "" if wanted is None else f"{wanted!r} is not one of them; "
    raise TaskError(
        f"proxy task {task!r} reports several metrics ({', '.join(sorted(available))}): "
        f"{asked}set filter.proxy_metric to the one to {purpose}"
    )


def sample_rows(results: dict[str, Any]) -> list[dict]:
    """lm-eval's logged samples as rows: task, doc_id, context and each metric's value."""
    rows = []
    for task, logged in results.get("samples", {}).items():
        for row in sorted(logged, key=lambda r: r["doc_id"]):
            values = {
                m: float(row[m])
                for m in row.get("metrics", ())
                if isinstance(row.get(m), numbers.Real)
            }
            context = row["arguments"][0][0] if row.get("arguments") else ""
            rows.append(
                {"task": task, "doc_id": row["doc_id"], "context": context, "values": values}
            )
    return rows


def scores_from_results(results: dict[str, Any]) -> list[Score]:
    """Flattens lm-eval's result dict (``results[task]["<metric>,<filter>"]``) into Scores.

    Groups that aggregate other tasks are reported too, with the summed document count.
    """
    n_samples = {task: int(n["effective"]) for task, n in results.get("n-samples", {}).items()}
    scores = []
    for task, metrics in results["results"].items():
        n = n_samples.get(task)
        if n is None:  # a group: count the documents of its subtasks
            n = sum(
                n_samples.get(sub, 0) for sub in results.get("group_subtasks", {}).get(task, [])
            )
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, numbers.Real):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            scores.append(
                Score(
                    task=task,
                    metric=metric if filter_name == "none" else f"{metric},{filter_name}",
                    value=float(value),
                    stderr=_float_or_none(stderr),
                    n_samples=n,
                )
            )
    return sorted(scores, key=lambda s: (s.task, s.metric))


@lru_cache(maxsize=8)
def task_manager(include_paths: tuple[str, ...] = (), builtin: bool = True) -> TaskManager:
    """A TaskManager seeing the demo tasks, ``include_paths`` and (``builtin``) lm-eval's own tasks.

    Indexing lm-eval's thousands of task yamls takes 20-45 s on a busy 2-core machine, so it
    is skipped when every requested task is local, and one manager is kept per setting.
    """
    from lm_eval.tasks import TaskManager

    paths = task_folders(include_paths)
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise TaskError(f"task folder not found: {missing[0]}")
    with quiet_lm_eval():
        manager = TaskManager(include_path=sorted(set(paths)), include_defaults=builtin)
    _resolve_data_files_beside_yaml(manager)
    return manager


_DATA_KEYS = ("data_files", "data_dir")


def _resolve_data_files_beside_yaml(manager: TaskManager) -> None:
    """Relative ``dataset_kwargs.data_files`` / ``data_dir`` of a task file are read
    relative to that file's folder, like every other path of a run.

    lm-eval hands them to ``datasets.load_dataset``, which resolves them against the working
    directory: a task folder next to the run config then works only when ``glue run`` is
    started from that folder. A path is rewritten only when it exists beside the YAML;
    anything else (absolute paths, URLs, globs, hub names) is passed through unchanged.
    """
    factory = getattr(manager, "_factory", None)
    load = getattr(factory, "_load_full_config", None)
    if load is None or getattr(load, "_glue_resolves_data", False):
        return  # another lm-eval layout: paths keep lm-eval's own (cwd) rule

    def load_full_config(entry, overrides=None):
        cfg = load(entry, overrides)
        yaml_path = getattr(entry, "yaml_path", None)
        kwargs = cfg.get("dataset_kwargs")
        if yaml_path and isinstance(kwargs, dict):
            folder = Path(yaml_path).parent
            cfg["dataset_kwargs"] = {
                k: _beside(v, folder) if k in _DATA_KEYS else v for k, v in kwargs.items()
            }
        return cfg

    load_full_config._glue_resolves_data = True  # type: ignore[attr-defined]
    factory._load_full_config = load_full_config


def _beside(value: Any, folder: Path) -> Any:
    if isinstance(value, dict):
        return {k: _beside(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_beside(v, folder) for v in value]
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
        candidate = folder / value
        if candidate.exists():
            return str(candidate)
    return value


@contextlib.contextmanager
def code_execution(allowed: bool) -> Iterator[None]:
    """``HF_ALLOW_CODE_EVAL=1`` for the call when the user opted in (the code metrics of
    ``evaluate`` refuse to run without it); otherwise the environment is left alone."""
    import os

    if not allowed:
        yield
        return
    saved = os.environ.get("HF_ALLOW_CODE_EVAL")
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = saved


def task_folders(include_paths: Sequence[str] = ()) -> list[str]:
    """The folders whose task files a run sees: the demo tasks, then ``include_paths``."""
    return [str(DEMO_TASKS_DIR), *(str(Path(p).resolve()) for p in include_paths)]


def unknown_tasks(tasks: Sequence[str], include_paths: Sequence[str] = ()) -> list[str]:
    """The names in ``tasks`` that neither the task folders nor lm-eval's own tasks define.

    Local folders are indexed first (fast); lm-eval's built-in index (tens of seconds) is
    only read when some name is not local. A missing folder raises :class:`TaskError`.
    """
    paths = tuple(include_paths)
    local = task_manager(paths, builtin=False)  # a missing folder raises here
    unknown = [t for t in tasks if not local.match_tasks([t])]
    if unknown:
        everything = task_manager(paths, builtin=True)
        unknown = [t for t in unknown if not everything.match_tasks([t])]
    return unknown


def manager_for(tasks: Sequence[str], include_paths: Sequence[str] = ()) -> TaskManager:
    """The cheapest TaskManager that knows every one of ``tasks`` (a clear error if none does)."""
    paths = tuple(include_paths)
    local = task_manager(paths, builtin=False)
    if all(local.match_tasks([t]) for t in tasks):
        return local
    unknown = unknown_tasks(tasks, include_paths)
    if unknown:
        raise TaskError(
            f"unknown lm-eval task(s) {', '.join(unknown)} (searched {', '.join(task_folders(include_paths))} "
            "and lm-eval's built-in tasks)"
        )
    return task_manager(paths, builtin=True)


def _hf_lm(
    model: str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    batch_size: int | str,
    device: str = "cpu",
    dtype: str | None = None,
) -> LM:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    from model_glue.devices import resolve_device, resolve_dtype

    if isinstance(model, str | Path):
        directory = Path(model)
        # clear errors for a missing dir, no config, pickled weights
        ckpt = Checkpoint(str(directory))
        device = resolve_device(device)
        _require_loadable(ckpt)
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=resolve_dtype(dtype, device, ckpt.main_dtype),
        ).to(device)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    elif not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"evaluate: model must be a directory, a PreTrainedModel or an lm-eval LM, not {type(model).__name__}"
        )
    elif tokenizer is None:
        raise ValueError(f"evaluate: an in-memory {type(model).__name__} needs its tokenizer")
    model.eval()
    with quiet_lm_eval():
        return HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, trust_remote_code=False
        )


class UnloadableModelError(InputError):
    """transformers has no model class for a checkpoint's architecture."""


def _require_loadable(ckpt: Checkpoint) -> None:
    """One line, not transformers' traceback, for a model type it does not know (a zoo
    entry of an architecture newer than the installed transformers, or not a causal LM)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(ckpt.uri, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        kind = ckpt.config.get("model_type") or "(none)"
        first = str(e).split(". ")[0].split("\n")[0]
        raise UnloadableModelError(
            f"{ckpt.uri}: transformers cannot load model type {kind!r} ({first})"
        ) from None


def _vllm_lm(model: str | Path, batch_size: int | str, device: str, dtype: str | None) -> LM:
    """lm-eval's vllm model on a model directory (GPU machines with the vllm extra)."""
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as e:  # checked at config time too
        raise TaskError(f"backend vllm: {e}; pip install 'model-glue[vllm]'") from None
    from model_glue.devices import dtype_label, resolve_device, resolve_dtype

    ckpt = Checkpoint(str(model))
    device = resolve_device(device)
    with quiet_lm_eval():
        return VLLM(
            pretrained=str(model),
            dtype=dtype_label(resolve_dtype(dtype, device, ckpt.main_dtype)),
            batch_size=batch_size,
            trust_remote_code=False,
        )


def _float_or_none(x: object) -> float | None:
    if isinstance(x, numbers.Real) and math.isfinite(float(x)):
        return float(x)
    return None


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Raises lm-eval's and its dependencies' loggers to ERROR and swallows progress bars
    for the duration of a call. tqdm reads ``TQDM_DISABLE`` only when it is imported, so the
    bars (written to ``sys.stderr``) are redirected instead; logging handlers keep the
    original stream, so errors still show."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), _no_environment_probe():
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _no_environment_probe() -> Iterator[None]:
    """``simple_evaluate`` runs ``git describe`` (which prints "fatal: not a git repository"
    on the terminal outside a repository) and torch's environment report (``pip``
    subprocesses) for its result header, which the pipeline never reads."""
    try:
        import lm_eval.evaluator as evaluator
    except ImportError:
        evaluator = None
    if not hasattr(evaluator, "add_env_info") or not hasattr(evaluator, "get_git_commit_hash"):
        yield
        return
    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash = lambda: None
    evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


__all__: Sequence[str] = (
    "DEMO_TASKS_DIR",
    "Score",
    "TaskError",
    "evaluate",
    "manager_for",
    "quiet_lm_eval",
    "scores_from_results",
    "task_folders",
    "task_manager",
    "unknown_tasks",
)
