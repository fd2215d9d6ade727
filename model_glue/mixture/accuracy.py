"""Router accuracy per task, and the proxy labels a fitted router learns from.

Router accuracy (issue 5): the share of samples sent to an expert that answers them correctly.
Samples that no expert answers cannot be routed well by any router, so the denominator is the
*answerable* samples; ``coverage`` (answerable / all) is reported beside it. Both need each
expert's per-sample correctness, which lm-eval gives when it logs samples.

Only sample-level routers over whole experts have a router accuracy: model-level mixtures. A
block-level route mixes layers of several experts and FFN-level routing is per token, so
neither has an "expert that answers the sample".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from model_glue.mixture.hidden import layer_inputs
from model_glue.mixture.model_level import ModelLevelMixture
from model_glue.mixture.routers import LinearGate, fit_linear_router
from model_glue.splits import Split, SplitTaskManager


@dataclass(frozen=True)
class ExpertCorrectness:
    """Per-sample correctness of every expert: ``correct[i, e]`` for sample i and expert e."""

    tasks: list[str]  # task of each sample
    doc_ids: list[int]
    contexts: list[str]  # the text each sample is routed on
    correct: torch.Tensor  # [N, E] float in {0, 1} (or the metric's value)
    expert_names: list[str]

    def subset(self, rows: Sequence[int]) -> ExpertCorrectness:
        return ExpertCorrectness(
            [self.tasks[i] for i in rows],
            [self.doc_ids[i] for i in rows],
            [self.contexts[i] for i in rows],
            self.correct[list(rows)],
            self.expert_names,
        )


@dataclass(frozen=True)
class RouterAccuracy:
    task: str  # a task name, or "all"
    accuracy: float | None  # routed to a correct expert / answerable (None if none answerable)
    coverage: float  # answerable / samples
    n_samples: int
    n_answerable: int


def expert_correctness(
    mixture: ModelLevelMixture,
    tasks: Sequence[str],
    *,
    metric: str | Mapping[str, str] | None = None,
    limit: int | None = None,
    samples: dict[str, list[int]] | None = None,
    include_paths: Sequence[str] = (),
    batch_size: int | str = 32,
    split: Split = "test",
) -> ExpertCorrectness:
    """Run every expert on ``tasks`` through lm-eval and keep each sample's ``metric``
    (default: each task's only metric; a task with several needs ``metric``), on the
    ``split``'s documents (``test``: a reported router accuracy; ``proxy``: fitting)."""
    import lm_eval

    from model_glue.evaluate import TaskError, manager_for
    from model_glue.mixture.lm import MixtureLM

    manager = SplitTaskManager(manager_for(tasks, include_paths), split)
    helper = MixtureLM(mixture, batch_size=batch_size)
    per_expert = []
    for e in range(len(mixture.names)):
        res = lm_eval.simple_evaluate(
            model=helper.lm_for(e),
            tasks=list(tasks),
            limit=limit,
            samples=samples,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=0,
        )
        per_expert.append(res["samples"])
    keys, contexts, values = [], [], []
    for task in tasks:
        rows = sorted(per_expert[0][task], key=lambda s: s["doc_id"])
        by_expert = [{s["doc_id"]: s for s in logged[task]} for logged in per_expert]
        for row in rows:
            logged = list(row.get("metrics", ()))
            wanted = metric.get(task) if isinstance(metric, Mapping) else metric
            name = wanted if wanted is not None else (logged[0] if len(logged) == 1 else None)
            if name is None or name not in row:
                raise TaskError(
                    f"router accuracy on task {task!r}: "
                    + (f"metric {wanted!r} not logged" if wanted else "several metrics")
                    + f" (logged: {', '.join(logged)}); set filter.proxy_metric"
                )
            keys.append((task, row["doc_id"]))
            contexts.append(row["arguments"][0][0])
            values.append([float(b[row["doc_id"]][name]) for b in by_expert])
    return ExpertCorrectness(
        [k[0] for k in keys],
        [k[1] for k in keys],
        contexts,
        torch.tensor(values),
        list(mixture.names),
    )


def router_accuracy(routes: Sequence[int], labels: ExpertCorrectness) -> list[RouterAccuracy]:
    """Router accuracy per task and over all samples, for the given routing decisions."""
    hit = (
        labels.correct[torch.arange(len(routes)), torch.tensor(list(routes), dtype=torch.long)] > 0
    )
    answerable = labels.correct.max(1).values > 0
    out = []
    for task in [*dict.fromkeys(labels.tasks), "all"]:
        rows = torch.tensor([task in ("all", t) for t in labels.tasks])
        n, n_ans = int(rows.sum()), int((rows & answerable).sum())
        acc = float((hit & rows & answerable).sum()) / n_ans if n_ans else None
        out.append(RouterAccuracy(task, acc, n_ans / n if n else 0.0, n, n_ans))
    return out


def mixture_router_accuracy(
    mixture: ModelLevelMixture, labels: ExpertCorrectness
) -> list[RouterAccuracy]:
    """Route the labelled samples with ``mixture``'s own router and score the decisions."""
    return router_accuracy(mixture.route(labels.contexts), labels)


def fit_mixture_router(
    mixture: ModelLevelMixture, labels: ExpertCorrectness, **fit_kwargs
) -> LinearGate:
    """A linear gate on ``mixture``'s router features (its backbone at its layer) from proxy labels."""
    features = layer_inputs(
        mixture.backbone,
        mixture.backbone_tokenizer,
        labels.contexts,
        [mixture.layer],
        pooling=mixture.pooling,
    )[0]
    return fit_linear_router(features, labels.correct, **fit_kwargs)
