"""lm-evaluation-harness adapter: score a model on lm-eval tasks, in-process.

Every score of the pipeline (proxy scores during search, final benchmarks) goes through
:func:`evaluate`, so one place decides how models are loaded (safetensors only, no remote
code), which task folders are visible (the demo tasks always are), and how lm-eval's
nested result dict becomes flat :class:`Score` records with plain Python numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_glue.checkpoint import Checkpoint

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEMO_TASKS_DIR = Path(__file__).resolve().parent / "zoo" / "lm_tasks"
BOOTSTRAP_ITERS = 1000  # only metrics without a closed-form stderr bootstrap; `mean` does not
_QUIET_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate")


@dataclass(frozen=True)
class Score:
    """One metric of one task. ``metric`` carries lm-eval's filter name when it is not ``none``."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n_samples: int


def evaluate(
    model: str | Path | PreTrainedModel | LM,
    tasks: list[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    limit: int | None = None,
    include_paths: list[str] | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> list[Score]:
    """Runs ``tasks`` on ``model`` with ``lm_eval.simple_evaluate``; one Score per (task, metric).

    ``model`` is a local Hugging Face directory, an in-memory ``PreTrainedModel`` (with its
    ``tokenizer``; used by search trials so that no checkpoint is written), or a built lm-eval
    ``LM`` (mixtures). ``limit`` caps the documents per task. Greedy tasks give the same
    scores on every call; ``seed`` fixes lm-eval's samplers (few-shot, sampling tasks).
    """
    if not tasks:
        raise ValueError("evaluate: no tasks given")
    import lm_eval
    from lm_eval.api.model import LM

    lm = model if isinstance(model, LM) else _hf_lm(model, tokenizer, batch_size)
    manager = task_manager(tuple(include_paths or ()), builtin=False)
    if not all(manager.match_tasks([t]) for t in tasks):  # e.g. arc_challenge: lm-eval's own tasks
        manager = task_manager(tuple(include_paths or ()), builtin=True)
    with quiet_lm_eval():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("evaluate: lm-eval returned no results")
    return scores_from_results(results)


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

    paths = [str(DEMO_TASKS_DIR)] + [str(Path(p).resolve()) for p in include_paths]
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise FileNotFoundError(f"evaluate: task include path(s) not found: {missing}")
    with quiet_lm_eval():
        return TaskManager(include_path=sorted(set(paths)), include_defaults=builtin)


def _hf_lm(
    model: str | Path | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, batch_size: int
) -> LM:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(model, str | Path):
        directory = Path(model)
        Checkpoint(str(directory))  # clear errors for a missing dir, no config, pickled weights
        model = AutoModelForCausalLM.from_pretrained(
            directory, use_safetensors=True, trust_remote_code=False, dtype="auto"
        )
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
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


__all__: Sequence[str] = (
    "DEMO_TASKS_DIR",
    "Score",
    "evaluate",
    "quiet_lm_eval",
    "scores_from_results",
    "task_manager",
)
