"""The concrete ``merge_and_score``: merge resident state dicts in memory, score on proxy tasks.

A search makes tens to hundreds of trials on one cluster, so everything that does not change
between trials is done once: the cluster's state dicts are read once and kept in memory, one
model object is built once and each trial's merge is copied into its weights in place, and
lm-eval runs in-process on the proxy tasks with a ``limit``. No checkpoint is written for a
trial; only the chosen merge is materialised afterwards, by the merge engine.

Memory: :meth:`ProxyScorer.from_checkpoints` keeps no member resident. The members are
:class:`~model_glue.checkpoint.LazyTensors` (headers only); each trial reads the tensors it
merges one at a time and the merger writes each merged tensor straight into the one model
object, in the evaluation dtype on the evaluation device. A trial's resident memory is that
model plus the members' copies of one tensor (float32 while merging), independent of the
cluster's size. Resident state dicts (the constructor) still work, for tests and small models.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import model_glue.merge.methods  # noqa: F401  (registers the merge methods)
from model_glue.architectures import resolve_layout
from model_glue.checkpoint import Checkpoint, CheckpointError, LazyTensors, tensor_shapes
from model_glue.merge.memory import Merger
from model_glue.merge.registry import get_method
from model_glue.search.engine_params import engine_model_params
from model_glue.search.records import TrialSpec
from model_glue.search.similarity_order import mlp_similarity

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

StateDict = Mapping[str, torch.Tensor]
# The proxy evaluation of a model already holding the merged weights -> proxy score.
ProxyFn = Callable[["PreTrainedModel"], float]


@dataclass(frozen=True)
class TrialCost:
    """Where one trial's time went: merging in memory vs proxy evaluation."""

    method: str
    models: int  # a one-model linear "merge" is the model itself and costs no merging
    merge_seconds: float
    eval_seconds: float


class ProxyScorer:
    """``merge_and_score`` for the search strategies, over resident state dicts.

    ``states`` maps model names to state dicts of one architecture; ``model`` is a model
    object of that architecture reused for every trial; ``proxy`` scores it. ``base`` is the
    base model's state dict, given to the methods that take task vectors against a base
    (task arithmetic, TIES, DARE, ...). ``method_params`` holds fixed parameters per method,
    e.g. ``{"ties": {"density": 0.5}}``; a trial's own densities override them.

    Merging goes through the engine's :class:`~model_glue.merge.memory.Merger`, prepared
    once per (method, set of models) and kept for the next trials; coefficients are
    translated by :func:`~model_glue.search.engine_params.engine_model_params`, the same
    translation the pipeline uses to materialise the chosen merge.
    """

    max_mergers = 4  # greedy visits a growing accepted set; old sets are not asked again

    def __init__(
        self,
        states: Mapping[str, StateDict],
        model: PreTrainedModel,
        proxy: ProxyFn,
        *,
        base: StateDict | None = None,
        method_params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if not states:
            raise ValueError("ProxyScorer needs the state dicts of at least one model")
        self.states = dict(states)
        self.base = base
        self.model = model
        self.proxy = proxy
        self.method_params = {k: dict(v) for k, v in (method_params or {}).items()}
        self.costs: list[TrialCost] = []
        self.tensor_names = _check_same_layout(self.states, base)
        ref = self.states[min(self.states)]
        self.layout = resolve_layout(model.config.to_dict(), tensor_shapes(ref))
        self.num_layers = self.layout.num_layers
        self._target = _check_model_accepts(model, self.tensor_names, ref)
        self._mlp_names = self.layout.select(("mlp",))
        self._mergers: dict[tuple[str, tuple[str, ...]], Merger] = {}
        self._similarity_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Mapping[str, str | Path],
        tasks: Sequence[str],
        *,
        limit: int | None,
        base: str | Path | None = None,
        metric: str | Mapping[str, str] | None = None,
        method_params: Mapping[str, Mapping[str, Any]] | None = None,
        include_paths: Sequence[str] = (),
        device: str = "cpu",
        dtype: str | None = None,
        batch_size: int | str = 32,
        allow_code_execution: bool = False,
    ) -> ProxyScorer:
        """Reads each checkpoint once and scores merges with lm-eval on ``tasks`` (found in
        the demo task folder, ``include_paths`` or lm-eval's own tasks).

        The model object and tokenizer come from the first checkpoint (by name); all models
        of a cluster share architecture and tokenizer. ``device`` (``auto``, ``cpu``,
        ``cuda[:N]``) and ``dtype`` (default: the checkpoint's on a GPU, float32 on a CPU)
        place that model; merging itself runs in float32 on the CPU, one tensor at a time.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from model_glue.devices import resolve_device, resolve_dtype

        if not checkpoints:
            raise ValueError("ProxyScorer.from_checkpoints: no checkpoints given")
        states = {name: LazyTensors(str(uri)) for name, uri in sorted(checkpoints.items())}
        first = states[min(states)]
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device, stored=first.checkpoint.main_dtype)
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoints[min(checkpoints)]),
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
        ).to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoints[min(checkpoints)]))
        proxy = LmEvalProxy(
            tasks,
            tokenizer,
            limit=limit,
            metric=metric,
            include_paths=include_paths,
            batch_size=batch_size,
            allow_code_execution=allow_code_execution,
        )
        base_state = LazyTensors(str(base)) if base is not None else None
        return cls(states, model, proxy, base=base_state, method_params=method_params)

    # -- the scoring function -------------------------------------------------------------

    def __call__(self, spec: TrialSpec) -> float:
        start = time.perf_counter()
        self.merge_into_model(spec)
        merged_at = time.perf_counter()
        score = float(self.proxy(self.model))
        self.costs.append(
            TrialCost(
                spec.method, len(spec.models), merged_at - start, time.perf_counter() - merged_at
            )
        )
        return score

    def merge(self, spec: TrialSpec) -> dict[str, torch.Tensor]:
        """The merged state dict of ``spec``, computed by the merge engine in memory."""
        self._check_known(spec)
        if len(spec.models) == 1 and spec.method == "linear":
            return dict(self.states[spec.models[0]])  # a one-model average is the model
        merger = self._merger(spec.method, tuple(spec.models))
        per_model = engine_model_params(spec, self.layout)
        return merger(
            params=self.method_params.get(spec.method),
            model_params=[per_model[name] for name in spec.models],
        )

    def merge_into_model(self, spec: TrialSpec) -> None:
        """Merge ``spec`` straight into the reused model's weights, tensor by tensor."""
        self._check_known(spec)
        if len(spec.models) == 1 and spec.method == "linear":
            self.load_into_model(self.states[spec.models[0]])  # one tensor read at a time
            return
        merger = self._merger(spec.method, tuple(spec.models))
        per_model = engine_model_params(spec, self.layout)
        merger.merge_into(
            self._target,
            params=self.method_params.get(spec.method),
            model_params=[per_model[name] for name in spec.models],
        )

    def load_into_model(self, merged: StateDict) -> None:
        """Copies a merged state dict into the reused model's weights, in place."""
        with torch.no_grad():
            for name, target in self._target.items():
                target.copy_(merged[name])

    def _check_known(self, spec: TrialSpec) -> None:
        unknown = [n for n in spec.models if n not in self.states]
        if unknown:
            raise KeyError(
                f"TrialSpec names model(s) not loaded in this scorer: {unknown}; "
                f"loaded: {sorted(self.states)}"
            )

    # -- the "similarity" heuristic ---------------------------------------------------------

    def similarity(
        self, current: Mapping[str, float], candidate: str, *, method: str = "linear"
    ) -> float:
        """MLP similarity of the current merge (``current`` weights) to ``candidate``."""
        if candidate not in self.states:
            raise KeyError(
                f"similarity: model {candidate!r} is not loaded; loaded: {sorted(self.states)}"
            )
        key = (method, tuple(sorted(current.items())))
        merge = self._similarity_cache.get(key)
        if merge is None:
            self._similarity_cache.clear()  # only the latest merge is asked about
            merged = self.merge(TrialSpec(dict(current), method))
            merge = self._similarity_cache[key] = {n: merged[n] for n in self._mlp_names}
        return mlp_similarity(merge, self.states[candidate], self.layout, candidate_name=candidate)

    # -- engine plumbing ----------------------------------------------------------------------

    def _merger(self, method: str, models: tuple[str, ...]) -> Merger:
        key = (method, models)
        merger = self._mergers.pop(key, None)
        if merger is None:
            rule = get_method(method).base
            if rule == "required" and self.base is None:
                raise ValueError(f"merge method {method!r} needs a base model; none was given")
            merger = Merger(
                method,
                [self.states[m] for m in models],
                self.base if rule != "none" else None,  # "optional": task vectors when given
                names=list(models),
                num_layers=self.num_layers,
                layer_of=self.layout.layer_of,
            )
        self._mergers[key] = merger  # most recently used last
        while len(self._mergers) > self.max_mergers:
            del self._mergers[next(iter(self._mergers))]
        return merger


class LmEvalProxy:
    """Proxy score = mean over ``tasks`` of one lm-eval metric, on the first ``limit``
    documents of each task's proxy split (:mod:`model_glue.splits`).

    Same numbers as ``model_glue.evaluate.evaluate`` (same task manager, same result
    flattening), but prepared once per model object: ``simple_evaluate`` rebuilds the lm-eval
    model wrapper and the tasks and collects environment information (a ``pip`` subprocess)
    on every call, which roughly doubled the cost of a proxy evaluation of a demo model.
    Search trials copy new weights into the same model object, so the wrapper and the
    loaded tasks stay valid between calls.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        *,
        limit: int | None,
        metric: str | Mapping[str, str] | None = None,
        batch_size: int | str = 32,
        seed: int = 0,
        include_paths: Sequence[str] = (),
        allow_code_execution: bool = False,
    ) -> None:
        if not tasks:
            raise ValueError("LmEvalProxy: no proxy tasks given")
        self.tasks = list(tasks)
        self.include_paths = tuple(include_paths)
        self.tokenizer = tokenizer
        self.limit = limit
        self.metric = metric  # one name for every task, or task -> name
        self.allow_code_execution = allow_code_execution
        self.batch_size = batch_size
        self.seed = seed
        self.last: dict[str, float] = {}
        self._model: PreTrainedModel | None = None
        self._lm = None
        self._loaded = None

    def __call__(self, model: PreTrainedModel) -> float:
        import lm_eval.evaluator

        from model_glue.evaluate import BOOTSTRAP_ITERS, code_execution, scores_from_results

        if model is not self._model:
            self._prepare(model)
        with _quiet_lm_eval(), code_execution(self.allow_code_execution):
            results = lm_eval.evaluator.evaluate(
                lm=self._lm,
                task_dict=self._loaded,
                limit=self.limit,
                log_samples=False,
                bootstrap_iters=BOOTSTRAP_ITERS,
                confirm_run_unsafe_code=self.allow_code_execution,
            )
        return self._mean(scores_from_results(results))

    def _prepare(self, model: PreTrainedModel) -> None:
        from lm_eval.models.huggingface import HFLM

        from model_glue.evaluate import manager_for
        from model_glue.splits import SplitTaskManager

        model.eval()
        # selection reads the proxy split only: never a document the leaderboard reports
        manager = SplitTaskManager(manager_for(self.tasks, self.include_paths), "proxy")
        with _quiet_lm_eval():
            self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
            self._loaded = manager.load(self.tasks)
        for task in self._loaded["tasks"].values():
            # What simple_evaluate does before evaluating: 0-shot unless the task says
            # otherwise, and a fixed few-shot sampler seed.
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=self.seed)
        self._model = model

    def _mean(self, scores: list) -> float:
        from model_glue.evaluate import chosen_metric

        per_task: dict[str, float] = {}
        for task in self.tasks:
            mine = {s.metric: s.value for s in scores if s.task == task}
            per_task[task] = mine[chosen_metric(task, list(mine), self.metric)]
        self.last = per_task
        return sum(per_task.values()) / len(per_task)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every request batch at INFO; a search makes hundreds of them."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_state_dict(uri: str | Path) -> dict[str, torch.Tensor]:
    """Every floating tensor of a checkpoint, as float32 (merging precision)."""
    checkpoint = Checkpoint(str(uri))
    return {
        name: t.float() if t.is_floating_point() else t for name, t in checkpoint.iter_tensors()
    }


def _check_same_layout(states: Mapping[str, StateDict], base: StateDict | None) -> list[str]:
    ref_name = min(states)
    ref = states[ref_name]
    others = dict(states) | ({"<base>": base} if base is not None else {})
    ref_shapes = tensor_shapes(ref)
    for name, sd in others.items():
        if sd.keys() != ref.keys():
            diff = sorted(set(sd) ^ set(ref))
            raise CheckpointError(
                f"model {name!r} and {ref_name!r} differ in tensors, e.g. {diff[:3]}"
            )
        for key, shape in tensor_shapes(sd).items():
            if shape != ref_shapes[key]:
                raise CheckpointError(
                    f"model {name!r}: tensor {key!r} has shape {shape}, {ref_name!r} has {ref_shapes[key]}"
                )
    return sorted(ref)


def _check_model_accepts(
    model: PreTrainedModel, names: Sequence[str], stored: StateDict
) -> dict[str, torch.Tensor]:
    """The model's own tensor for each checkpoint tensor (merges are copied into them).

    transformers may rename a tensor on load (GPT-NeoX's ``embed_out`` is ``lm_head`` in
    memory): a checkpoint name the model lacks is matched to the one unmatched model tensor
    of its shape holding the same values (the model was loaded from ``stored``)."""
    own = model.state_dict()
    target = {n: own[n] for n in names if n in own}
    spare = {k: v for k, v in own.items() if k not in target}
    for n in (n for n in names if n not in own):
        value = stored[n]
        same = [
            k for k, v in spare.items()
            if tuple(v.shape) == tuple(value.shape) and torch.equal(v.cpu(), value.to(v.dtype).cpu())
        ]  # fmt: skip
        if len(same) != 1:
            raise CheckpointError(
                f"{type(model).__name__} has no tensor for {n!r} of the checkpoints "
                "(transformers stores it under another name or layout in memory)"
            )
        target[n] = spare.pop(same[0])
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    # a tied head shares the embedding's storage: covered when the embedding is
    shared = {t.data_ptr() for t in target.values()}
    untied = [k for k, v in spare.items() if k not in tied and v.data_ptr() not in shared]
    if untied:
        raise CheckpointError(
            f"the checkpoints lack tensor(s) {untied[:3]} of {type(model).__name__}"
        )
    return target
