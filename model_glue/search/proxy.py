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

Vocabularies: with ``tokenizer`` (``union``, ``base`` or a model's name, as
``MergeSpec.tokenizer``; the pipeline passes the run's ``merge.tokenizer``) a cluster whose
members' vocabularies differ (a fine-tune that appended a token) is searched too; see
:class:`TrialVocabularies`. Where every input already has the merged vocabulary (the usual
cluster) nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import model_glue.merge.methods  # noqa: F401  (registers the merge methods)
from model_glue.architectures import Layout, resolve_layout
from model_glue.checkpoint import Checkpoint, CheckpointError, LazyTensors, tensor_shapes
from model_glue.merge.memory import Merger
from model_glue.merge.registry import get_method
from model_glue.merge.tokenizer import (
    MergedVocabulary,
    VocabularyError,
    build_vocabulary,
    copy_tokenizer_files,
    has_tokenizer,
    load_tokenizer,
    pipeline_tokenizer,
    vocab_size,
)
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


@dataclass(frozen=True)
class TrialVocabulary:
    """What one trial's inputs are merged and scored with: ``vocabulary`` (None: rows by
    index, every input having ``rows`` rows), the merged model's ``rows`` and the
    ``tokenizer`` its checkpoint is written with, as loaded back."""

    vocabulary: MergedVocabulary | None
    rows: int
    tokenizer: Any


class TrialVocabularies:
    """The merged vocabulary of each trial of a search over members whose vocabularies
    differ, and the tokenizer that scores it (``tokenizer``: ``union``, ``base`` or an
    input's name, as ``MergeSpec.tokenizer``).

    A trial's vocabulary is the one the streaming merge of *that trial's inputs* has, as
    the pipeline's merge stage (``tasks.merge``) sets it up: the base (when the method takes
    it) and the trial's members in ``order`` (the final merge's order: ``merge_spec`` sorts
    a cluster's members by fingerprint, and the filter task passes that order);
    :func:`~model_glue.merge.tokenizer.build_vocabulary` with the base, else the first
    member, as the reference and the base's rows preferred; a model's name that is not
    among the inputs means ``union``; and ``union`` over inputs of one configured
    vocabulary size means no vocabulary at all (rows by index, the reference's tokenizer
    files as they are; the merge stage's rule). Not one vocabulary for the whole cluster: a search drops members,
    and a token only a dropped member has is not in the merge that is written, where a
    cluster-wide vocabulary would score every trial with it (a zero row, a logit of 0 in
    every softmax). So each trial's scored model and tokenizer are the merged
    checkpoint's for those coefficients. A one-model linear trial is the member itself
    (what the pipeline keeps for a cluster whose search kept one member): its own rows
    and tokenizer (:meth:`alone`).

    ``tokenizer_dirs``: each input's local tokenizer directory (None: it has none, and is
    taken to have the reference's, as the merge engine does); ``vocab_sizes``: each input's
    configured vocabulary size (its embedding rows). A trial's vocabulary is built when a
    trial first asks for it (loading the inputs' tokenizers); the latest few are kept.
    """

    keep = 8

    def __init__(
        self,
        tokenizer: str,
        tokenizer_dirs: Mapping[str, str | Path | None],
        vocab_sizes: Mapping[str, int],
        order: Sequence[str],
        *,
        base_name: str | None = None,
    ) -> None:
        self.source = tokenizer
        self.dirs = {n: Path(d) if d is not None else None for n, d in tokenizer_dirs.items()}
        self.sizes = dict(vocab_sizes)
        self.order = list(order)
        self.base_name = base_name
        everyone = [*self.order, *([base_name] if base_name else [])]
        missing = [n for n in everyone if n not in self.dirs or n not in self.sizes]
        if missing:
            raise ValueError(f"TrialVocabularies: no tokenizer directory or size for {missing}")
        self._built: OrderedDict[tuple, TrialVocabulary] = OrderedDict()
        self._alone: dict[str, TrialVocabulary] = {}

    def inputs(self, models: Sequence[str], *, with_base: bool) -> tuple[str, ...]:
        """A trial's inputs as the final merge lists them: the base first, then ``order``."""
        chosen = set(models)
        members = tuple(n for n in self.order if n in chosen)
        if with_base:
            if self.base_name is None:
                raise ValueError("TrialVocabularies: a trial with a base, but no base_name")
            return (self.base_name, *members)
        return members

    def source_for(self, inputs: Sequence[str]) -> str | None:
        """The ``tokenizer`` setting of the merge of ``inputs`` (None: rows by index), as
        the merge stage sets it (:func:`~model_glue.merge.tokenizer.pipeline_tokenizer`)."""
        return pipeline_tokenizer(self.source, inputs, [self.sizes[n] for n in inputs])

    def trial(self, inputs: Sequence[str], *, has_base: bool) -> TrialVocabulary:
        """The vocabulary, rows and tokenizer of the merge of ``inputs`` (base first)."""
        key = (tuple(inputs), has_base)
        found = self._built.pop(key, None)
        if found is None:
            found = self._build(key[0], has_base)
        self._built[key] = found  # most recently used last
        while len(self._built) > self.keep:
            del self._built[next(iter(self._built))]
        return found

    def alone(self, name: str) -> TrialVocabulary:
        """A member as it is: its own rows and its own tokenizer."""
        if name not in self._alone:
            d = self.dirs[name]
            if not has_tokenizer(d):
                raise VocabularyError(f"{name} has no tokenizer files to score it alone with")
            self._alone[name] = TrialVocabulary(None, self.sizes[name], load_tokenizer(d))
        return self._alone[name]

    def _build(self, inputs: tuple[str, ...], has_base: bool) -> TrialVocabulary:
        dirs = [self.dirs[n] for n in inputs]
        source = self.source_for(inputs)
        if source is None:
            if not has_tokenizer(dirs[0]):
                raise VocabularyError(f"{inputs[0]} has no tokenizer files")
            return TrialVocabulary(None, self.sizes[inputs[0]], load_tokenizer(dirs[0]))
        vocabulary = build_vocabulary(
            dirs,
            [self.sizes[n] for n in inputs],
            inputs,
            source=source,
            reference=0,  # MergeSpec.tokenizer_index(): the base, else the first model
            preferred=0 if has_base else None,  # MergeSpec.fill_index()
        )
        return TrialVocabulary(vocabulary, vocabulary.rows, _written_tokenizer(vocabulary, dirs))


def _written_tokenizer(vocabulary: MergedVocabulary, dirs: Sequence[Path | None]):
    """The tokenizer of a merged checkpoint with ``vocabulary``, as evaluating it loads it
    (the engine copies an input's files when unchanged, else saves the built tokenizer)."""
    if vocabulary.files_from is not None and dirs[vocabulary.files_from] is not None:
        return load_tokenizer(dirs[vocabulary.files_from])
    with tempfile.TemporaryDirectory(prefix="glue-search-tokenizer-") as d:
        vocabulary.save(d)
        return load_tokenizer(d)


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

    Vocabularies: ``tokenizer`` (``union``, ``base`` or a model's name; None: the members
    must have tensors of one shape) with ``tokenizer_dirs`` (each member's, and the base's
    under ``base_name``, local tokenizer directory) lets the members' embedding and lm_head
    rows differ. The whole cluster's merged vocabulary is built once: when every input
    already has it (same tokens at the same rows) the scorer works exactly as without
    ``tokenizer``. Otherwise each trial merges with its own inputs' merged vocabulary
    (:class:`TrialVocabularies`), its inputs listed in ``order`` (the final merge's order;
    default: by name) as the streaming merge lists them; the model object is resized to
    that vocabulary's rows before the merge is copied in, and ``self.tokenizer`` is the
    trial's tokenizer, given to the proxy when it has a ``tokenizer`` attribute
    (:class:`LmEvalProxy`). ``vocab_sizes``: each input's configured vocabulary size
    (default: its token embedding's rows).
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
        tokenizer: str | None = None,
        tokenizer_dirs: Mapping[str, str | Path | None] | None = None,
        vocab_sizes: Mapping[str, int | None] | None = None,
        order: Sequence[str] | None = None,
        base_name: str = "base",
    ) -> None:
        if not states:
            raise ValueError("ProxyScorer needs the state dicts of at least one model")
        self.states = dict(states)
        self.base = base
        self.model = model
        self.proxy = proxy
        self.method_params = {k: dict(v) for k, v in (method_params or {}).items()}
        self.costs: list[TrialCost] = []
        self.tokenizer = None  # the latest trial's, when trials change vocabularies
        ref = self.states[min(self.states)]
        if tokenizer is None:
            self.tensor_names = _check_same_layout(self.states, base)
            self.layout = resolve_layout(model.config.to_dict(), tensor_shapes(ref))
        else:
            self.layout = resolve_layout(model.config.to_dict(), tensor_shapes(ref))
            rows = _vocabulary_tensor_names(self.layout, ref)
            self.tensor_names = _check_same_layout(self.states, base, rows_may_differ=rows)
        self.num_layers = self.layout.num_layers
        self._target = _check_model_accepts(model, self.tensor_names, ref)
        self._mlp_names = self.layout.select(("mlp",))
        self._mergers: dict[tuple[str, tuple[str, ...]], Merger] = {}
        self._similarity_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.vocabularies: TrialVocabularies | None = None
        if tokenizer is not None:
            self.vocabularies = self._cluster_vocabularies(
                tokenizer, tokenizer_dirs, vocab_sizes, order, base_name
            )

    def _cluster_vocabularies(
        self,
        tokenizer: str,
        tokenizer_dirs: Mapping[str, str | Path | None] | None,
        vocab_sizes: Mapping[str, int | None] | None,
        order: Sequence[str] | None,
        base_name: str,
    ) -> TrialVocabularies | None:
        """The trials' vocabularies, or None when the whole cluster's merged vocabulary is
        every input's own (then no trial permutes rows, and nothing changes)."""
        order = list(order) if order is not None else sorted(self.states)
        if sorted(order) != sorted(self.states):
            raise ValueError(f"order {order} does not list the models {sorted(self.states)}")
        if tokenizer_dirs is None:
            raise ValueError("ProxyScorer: tokenizer is set but no tokenizer_dirs are given")
        if self.base is not None and base_name in self.states:
            raise ValueError(f"base_name {base_name!r} is also a member's name")
        embed = self.layout.embeddings[0] if self.layout.embeddings else None
        if embed is None:
            raise VocabularyError("no token embedding found to match vocabularies by")
        inputs = {**self.states, **({base_name: self.base} if self.base is not None else {})}
        sizes = {n: self._rows_of(sd) for n, sd in inputs.items()}
        sizes |= {n: s for n, s in (vocab_sizes or {}).items() if s is not None}
        vocabularies = TrialVocabularies(
            tokenizer,
            tokenizer_dirs,
            sizes,
            order,
            base_name=base_name if self.base is not None else None,
        )
        has_base = self.base is not None
        everything = vocabularies.inputs(order, with_base=has_base)
        whole = vocabularies.trial(everything, has_base=has_base).vocabulary
        if whole is None or whole.identity:
            return None  # every trial's merge has every input's rows, as they are
        return vocabularies

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
        tokenizer: str | None = None,
        order: Sequence[str] | None = None,
        base_name: str = "base",
    ) -> ProxyScorer:
        """Reads each checkpoint once and scores merges with lm-eval on ``tasks`` (found in
        the demo task folder, ``include_paths`` or lm-eval's own tasks).

        The model object and tokenizer come from the first checkpoint (by name); all models
        of a cluster share architecture and tokenizer. ``device`` (``auto``, ``cpu``,
        ``cuda[:N]``) and ``dtype`` (default: the checkpoint's on a GPU, float32 on a CPU)
        place that model; merging itself runs in float32 on the CPU, one tensor at a time.

        ``tokenizer`` (``union``, ``base`` or a member's, or ``base_name``'s, name; the
        pipeline's ``merge.tokenizer``): members whose vocabularies differ are searched
        too, each trial with the vocabulary and tokenizer its merge is written with (see
        the class); ``order``: the members in the order the final merge lists them
        (default: by name). The inputs' tokenizer files and configs are read here
        (tokenizers of remote checkpoints are copied to a temporary folder, removed with
        the scorer).
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
        tokenizer_obj = AutoTokenizer.from_pretrained(str(checkpoints[min(checkpoints)]))
        proxy = LmEvalProxy(
            tasks,
            tokenizer_obj,
            limit=limit,
            metric=metric,
            include_paths=include_paths,
            batch_size=batch_size,
            allow_code_execution=allow_code_execution,
        )
        base_state = LazyTensors(str(base)) if base is not None else None
        vocab: dict[str, Any] = {}
        tmp: Path | None = None
        if tokenizer is not None:
            inputs = dict(states) | ({base_name: base_state} if base_state is not None else {})
            if base_state is not None and base_name in states:
                raise ValueError(f"base_name {base_name!r} is also a member's name")
            tmp = Path(tempfile.mkdtemp(prefix="glue-search-tokenizers-"))
            vocab = {
                "tokenizer": tokenizer,
                "tokenizer_dirs": _local_tokenizer_dirs(
                    {n: sd.checkpoint for n, sd in inputs.items()}, tmp
                ),
                "vocab_sizes": {n: vocab_size(sd.checkpoint.config) for n, sd in inputs.items()},
                "order": list(order) if order is not None else None,
                "base_name": base_name,
            }
        try:
            scorer = cls(
                states, model, proxy, base=base_state, method_params=method_params, **vocab
            )
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if tmp is not None:
            weakref.finalize(scorer, shutil.rmtree, tmp, True)
        return scorer

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
        models = self._models_of(spec)
        merger = self._merger(spec.method, models)
        per_model = engine_model_params(spec, self.layout)
        return merger(
            params=self.method_params.get(spec.method),
            model_params=[per_model[name] for name in models],
        )

    def merge_into_model(self, spec: TrialSpec) -> None:
        """Merge ``spec`` straight into the reused model's weights, tensor by tensor (with
        differing vocabularies: the model resized to the trial's, ``self.tokenizer`` set)."""
        self._check_known(spec)
        if len(spec.models) == 1 and spec.method == "linear":
            (name,) = spec.models
            if self.vocabularies is not None:
                self._use_vocabulary(self.vocabularies.alone(name))
            self.load_into_model(self.states[name])  # one tensor read at a time
            return
        models = self._models_of(spec)
        merger = self._merger(spec.method, models)
        if self.vocabularies is not None:
            self._use_vocabulary(self._trial_vocabulary(spec.method, models))
        per_model = engine_model_params(spec, self.layout)
        merger.merge_into(
            self._target,
            params=self.method_params.get(spec.method),
            model_params=[per_model[name] for name in models],
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

    # -- vocabularies -----------------------------------------------------------------------

    def _models_of(self, spec: TrialSpec) -> tuple[str, ...]:
        """The merge's models in input order: the trial's, or with differing vocabularies
        the final merge's (``order``), so that rows and sums come out as it writes them."""
        if self.vocabularies is None:
            return tuple(spec.models)
        return self.vocabularies.inputs(spec.models, with_base=False)

    def _trial_vocabulary(self, method: str, models: Sequence[str]) -> TrialVocabulary:
        assert self.vocabularies is not None
        has_base = self.base is not None and get_method(method).base != "none"
        inputs = self.vocabularies.inputs(models, with_base=has_base)
        return self.vocabularies.trial(inputs, has_base=has_base)

    def _rows_of(self, state: StateDict) -> int:
        embed = self.layout.embeddings[0]
        if isinstance(state, LazyTensors):
            return state.shapes[embed][0]  # from the header: nothing read
        return state[embed].shape[0]

    def _use_vocabulary(self, trial: TrialVocabulary) -> None:
        """Resize the model's embedding (and head) to the trial's rows when it has another
        number, and hand the trial's tokenizer to the proxy."""
        embed = self.layout.embeddings[0]
        if self._target[embed].shape[0] != trial.rows:
            keys = _state_keys(self.model, self._target)
            self.model.resize_token_embeddings(trial.rows, mean_resizing=False)
            own = self.model.state_dict()
            self._target = {n: own[k] for n, k in keys.items()}
        self.tokenizer = trial.tokenizer
        if hasattr(self.proxy, "tokenizer"):
            self.proxy.tokenizer = trial.tokenizer  # type: ignore[attr-defined]

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
            base = self.base if rule != "none" else None  # "optional": task vectors when given
            vocabulary = None
            if self.vocabularies is not None:
                vocabulary = self._trial_vocabulary(method, models).vocabulary
            merger = Merger(
                method,
                [self.states[m] for m in models],
                base,
                names=list(models),
                num_layers=self.num_layers,
                layer_of=self.layout.layer_of,
                vocabulary=vocabulary,
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
    loaded tasks stay valid between calls. ``tokenizer`` may be replaced between calls (a
    search whose trials have different vocabularies): the next call wraps the model with
    it (the last few wrappers are kept), the loaded tasks stay.
    """

    keep_wrappers = 4

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
        self._lms: OrderedDict[int, tuple[Any, Any]] = OrderedDict()  # id(tokenizer) -> it, HFLM

    def __call__(self, model: PreTrainedModel) -> float:
        import lm_eval.evaluator

        from model_glue.evaluate import BOOTSTRAP_ITERS, code_execution, scores_from_results

        if model is not self._model:
            self._prepare(model)
        elif self._lm_tokenizer is not self.tokenizer:
            self._wrap(model)
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

    @property
    def _lm_tokenizer(self):
        return self._lms[next(reversed(self._lms))][0] if self._lms else None

    def _wrap(self, model: PreTrainedModel) -> None:
        """The lm-eval wrapper of ``model`` with ``self.tokenizer`` (kept per tokenizer)."""
        from lm_eval.models.huggingface import HFLM

        key = id(self.tokenizer)
        found = self._lms.pop(key, None)
        if found is None or found[0] is not self.tokenizer:
            with _quiet_lm_eval():
                lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
            found = (self.tokenizer, lm)
        self._lms[key] = found  # most recently used last
        while len(self._lms) > self.keep_wrappers:
            del self._lms[next(iter(self._lms))]
        self._lm = found[1]

    def _prepare(self, model: PreTrainedModel) -> None:
        from model_glue.evaluate import manager_for
        from model_glue.splits import SplitTaskManager

        model.eval()
        # selection reads the proxy split only: never a document the leaderboard reports
        manager = SplitTaskManager(manager_for(self.tasks, self.include_paths), "proxy")
        self._lms.clear()  # wrappers of another model object
        self._wrap(model)
        with _quiet_lm_eval():
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


def _check_same_layout(
    states: Mapping[str, StateDict],
    base: StateDict | None,
    *,
    rows_may_differ: Collection[str] = (),
) -> list[str]:
    """The tensor names every model (and the base) has, each of one shape; the tensors in
    ``rows_may_differ`` (a vocabulary's rows) may differ in their first dimension only."""
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
            want = ref_shapes[key]
            if key in rows_may_differ and len(shape) == len(want) and shape[1:] == want[1:]:
                continue
            if shape != want:
                raise CheckpointError(
                    f"model {name!r}: tensor {key!r} has shape {shape}, {ref_name!r} has {want}"
                )
    return sorted(ref)


def _vocabulary_tensor_names(layout: Layout, ref: StateDict) -> set[str]:
    """The tensors whose rows are tokens, as the streaming merge takes them: the token
    embedding and the head, with their biases."""
    names = {*layout.embeddings[:1], *([layout.head] if layout.head else [])}
    return names | {b for n in names if (b := n.removesuffix(".weight") + ".bias") in ref}


def _state_keys(model: PreTrainedModel, target: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """For each checkpoint tensor, the model's ``state_dict`` key of its target tensor."""
    own = model.state_dict()
    out = {}
    for n, t in target.items():
        if n in own and own[n].data_ptr() == t.data_ptr():
            out[n] = n
            continue
        out[n] = next(
            k for k, v in own.items() if v.data_ptr() == t.data_ptr() and v.shape == t.shape
        )
    return out


def _local_tokenizer_dirs(
    checkpoints: Mapping[str, Checkpoint], tmp: Path
) -> dict[str, Path | None]:
    """Each checkpoint's tokenizer directory on this machine (remote ones copied under
    ``tmp``); None for one without tokenizer files."""
    out: dict[str, Path | None] = {}
    for i, (name, ck) in enumerate(checkpoints.items()):
        if ck.is_local:
            out[name] = Path(ck.root) if has_tokenizer(ck.root) else None
            continue
        d = tmp / str(i)
        d.mkdir()
        copy_tokenizer_files(ck, d)
        out[name] = d if has_tokenizer(d) else None
    return out


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
