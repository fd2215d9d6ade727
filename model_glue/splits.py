"""Which documents choose and which documents report: the proxy and the test split.

Everything the recipe *selects* with (search trials, expert selection, router fitting, the
final choice) reads a task's **proxy** split; the leaderboard reports its **test** split,
and the two never share a document:

- a task with both a test and a validation split: proxy = validation, test = test;
- a task with one evaluation split (test, or validation when it has no test): one document
  in ``HOLDOUT_EVERY`` of it (positions 0, 5, 10, ...) is held out as the proxy split, and
  the reported evaluation runs on the others. The scores say so (``split``).

Splits are applied to lm-eval's loaded task objects, so every path that loads tasks through
:class:`SplitTaskManager` (evaluation, proxy scoring, router labels) sees the same documents.
"""

from __future__ import annotations

from typing import Any, Literal

Split = Literal["test", "proxy"]
SPLITS: tuple[str, ...] = ("test", "proxy")
HOLDOUT_EVERY = 5


def restrict(task: Any, split: Split) -> str:
    """Restrict an lm-eval task's evaluation documents to ``split`` (in place); return what
    they are, e.g. ``"validation"`` or ``"test without held-out 1/5"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    cfg = task.config
    has_test, has_val = task.has_test_docs(), task.has_validation_docs()
    if has_test and has_val:
        if split == "proxy":
            name = cfg.validation_split
            cfg.test_split = None  # lm-eval then evaluates the validation documents
            return str(name)
        return str(cfg.test_split)
    name = cfg.test_split if has_test else cfg.validation_split
    docs = task.dataset[name]
    held = [i for i in range(len(docs)) if i % HOLDOUT_EVERY == 0]
    rest = [i for i in range(len(docs)) if i % HOLDOUT_EVERY]
    task.dataset[name] = docs.select(held if split == "proxy" else rest)
    if split == "proxy":
        return f"{name} held-out 1/{HOLDOUT_EVERY}"
    return f"{name} without held-out 1/{HOLDOUT_EVERY}"


class SplitTaskManager:
    """An lm-eval ``TaskManager`` whose loaded tasks evaluate ``split`` only; ``described``
    maps each leaf task to the documents it evaluates."""

    def __init__(self, manager: Any, split: Split) -> None:
        self._manager = manager
        self.split = split
        self.described: dict[str, str] = {}

    def load(self, tasks: Any) -> Any:
        loaded = self._manager.load(tasks)
        for name, task in loaded["tasks"].items():
            self.described[name] = restrict(task, self.split)
        return loaded

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)
