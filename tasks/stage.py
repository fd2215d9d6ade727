"""The stage protocol: one place that keys, finds or computes, and records a stage call.

A stage declares its work and what the work depends on, once:

- ``compute(store, key, **params) -> record``: the work, run only when the store has no
  complete record for the key. Its signature *is* the stage's parameter list.
- ``uses``: the :class:`Component` whose code it runs. Components name the other
  components they call (the search calls the merge engine and lm-eval), so a stage's code
  version is *composed*: a new engine version makes every search stale without anyone
  listing the engine in the search stage.
- ``not_in_key``: the parameters that do not change the result (the device, the batch
  size, a label), each with the reason. Every other parameter of ``compute``, with its
  default applied, is part of the key: a new parameter is keyed unless declared otherwise.
- ``key_parts(args) -> dict``: optional normalisation of some keyed values (content
  fingerprints instead of model references, sorted lists, task-file hashes instead of
  paths). It may replace values, never drop a parameter.
  ``key = sha256(stage, code version, keyed arguments)``.
- ``lineage(call, record) -> Lineage``: the artifacts, edges (with roles) and detail rows
  the call adds to the lineage database, written with the run's row in one transaction.
- ``pending(call) -> dict``: for stages whose output later calls are keyed on, the fields
  of a stand-in record that ``glue plan`` passes on while the call is stale.

A :class:`Call` computes its key once, in the flow; the same key is the Prefect cache key
(with the store's, since a record names paths in its store), the stage's lock, the store
key of its record and the ``cache_key`` of its ``runs`` row.

Caching rule: Prefect reuses a result only while the stage's record (and, for stages that
write models, the model directory) is complete in the store; :func:`for_call` asks for a
refresh when it is not. Deleting an artifact forces exactly that stage to run again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.states import Failed

from model_glue.errors import InputError
from storage import ArtifactStore, Lineage
from storage.locks import stage_lock
from tasks._quiet import quiet_handled_failures

# Every stage's record is stored as JSON under this artifact kind.
RECORD_KIND = "record"
# Set on a record that a stage found in the store instead of computing it (never stored):
# the recorder counts such a run as 'reused' and removes the mark.
REUSED = "_reused"
# Set on every record a stage returns (never stored): where it ran (host, worker, device),
# which the recorder writes to the run's row and removes.
PLACED = "_placed"


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object with sorted keys (the content address of a stage run)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Component:
    """A piece of code whose version changes results, and the components it calls."""

    name: str
    version: str
    uses: tuple[Component, ...] = ()

    def versions(self) -> dict[str, str]:
        """This component's version and those of everything it calls, by name."""
        out: dict[str, str] = {}
        for c in self.uses:
            out |= c.versions()
        return out | {self.name: self.version}


def compose(component: Component) -> str:
    """A code version string: ``name=version`` of every component used, sorted."""
    return " ".join(f"{k}={v}" for k, v in sorted(component.versions().items()))


def parse_versions(code_version: str | None) -> dict[str, str]:
    """The inverse of :func:`compose` (older, uncomposed strings give ``{"": string}``)."""
    if not code_version:
        return {}
    parts = code_version.split()
    if not all("=" in p for p in parts):
        return {"": code_version}
    return dict(p.split("=", 1) for p in parts)


def plain(value: Any) -> Any:
    """JSON-able form of call parameters: typed references (anything with ``to_dict``)
    become dicts at the task boundary."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _no_normalisation(args: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    compute: Callable[..., dict]
    uses: Component
    not_in_key: Mapping[str, str] = field(default_factory=dict)  # parameter -> why
    key_parts: Callable[[dict[str, Any]], dict[str, Any]] = _no_normalisation
    lineage: Callable[[Call, dict], Lineage] = field(default=lambda call, record: Lineage())
    describe: Callable[[dict], list[str]] = field(default=lambda record: [])
    outputs: tuple[str, ...] = ()  # store kinds written under the key besides the record
    # what later steps read from this stage's record, as a stand-in while the call is stale
    # (``glue plan`` keys later calls on it; values naming models are filled in); None:
    # later calls wait on this one
    pending: Callable[[Call], dict] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.not_in_key) - set(self.parameters)
        if unknown:
            raise TypeError(
                f"stage {self.name!r}: not_in_key names {sorted(unknown)}, which "
                f"{self.compute.__name__} does not take"
            )

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        """``compute``'s parameters after ``store`` and ``key``: the stage's parameters."""
        return dict(list(inspect.signature(self.compute).parameters.items())[2:])

    @property
    def code_version(self) -> str:
        return compose(self.uses)

    def arguments(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` bound to ``compute``'s signature, defaults applied (a TypeError names
        a missing or unknown parameter)."""
        bound = inspect.signature(self.compute).bind(None, None, **params)
        bound.apply_defaults()
        return dict(list(bound.arguments.items())[2:])

    def keyed(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The keyed arguments: every parameter not declared ``not_in_key``, with the
        values ``key_parts`` normalises replaced."""
        keyed = {k: v for k, v in args.items() if k not in self.not_in_key}
        parts = self.key_parts(dict(keyed))
        if extra := set(parts) - set(keyed):
            raise TypeError(f"stage {self.name!r}: key_parts returned {sorted(extra)}")
        return keyed | parts

    def identity(self, params: Mapping[str, Any]) -> dict:
        """What the key hashes: the stage, its composed code version and the keyed
        arguments of the call."""
        return {
            "stage": self.name,
            "v": self.code_version,
            "in": self.keyed(self.arguments(params)),
        }

    def key(self, params: Mapping[str, Any]) -> str:
        return stable_hash(self.identity(params))

    def find(self, store: ArtifactStore, key: str, verify: str = "hash") -> dict | None:
        """The complete record already in the store for ``key`` (marked ``REUSED``)."""
        if not store.exists(RECORD_KIND, key, verify=verify):
            return None
        if not all(store.exists(kind, key) for kind in self.outputs):
            return None
        return {**store.get_json(RECORD_KIND, key), REUSED: True}

    def task(self, **task_options: Any):
        """Wrap ``compute(store, key, **params) -> record`` as a cached Prefect task whose
        parameters are ``store_url``, ``key`` (computed when not given) and ``params``.

        Under a per-key lock (one computation per key across runs sharing the store) the
        task returns the stored record if complete, else computes and stores it. An
        :class:`~model_glue.errors.InputError` (a truncated checkpoint, an unknown task)
        ends the task in a handled ``Failed`` state whose message is the error's one line;
        any other exception fails it with its traceback, as Prefect does."""
        stage, compute = self, self.compute

        def body(**kwargs: Any) -> Any:
            store = ArtifactStore(kwargs.pop("store_url"))
            key = kwargs.pop("key", None)
            quiet_handled_failures()  # also in Dask workers: one line per input error
            try:
                key = key or stage.key(kwargs)
                with stage_lock(store, stage.name, key):
                    record = stage.find(store, key)
                    if record is None:
                        record = compute(store, key, **kwargs)
                        record = {**record, "key": key, "stage": stage.name}
                        store.put_json(RECORD_KIND, key, record, meta={"stage": stage.name})
            except InputError as e:
                return Failed(message=input_error_message(e))
            return {**record, PLACED: placement(kwargs.get("device"))}

        params = list(inspect.signature(compute).parameters.values())[2:]
        body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter("store_url", inspect.Parameter.KEYWORD_ONLY),
                inspect.Parameter("key", inspect.Parameter.KEYWORD_ONLY, default=None),
                *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params),
            ]
        )
        body.__name__ = body.__qualname__ = compute.__name__.lstrip("_")
        body.__doc__ = compute.__doc__
        body.__module__ = compute.__module__

        def cache_key_fn(_ctx: Any, params: dict[str, Any]) -> str:
            key = params.get("key") or stage.key(
                {k: v for k, v in params.items() if k not in ("store_url", "key")}
            )
            # a result names paths in its store: another store's cached result is not ours
            return f"{stage.name}-{key}-{stable_hash(str(params['store_url']))[:8]}"

        options = {
            "name": self.name,
            "cache_key_fn": cache_key_fn,
            "persist_result": True,
            "result_serializer": "json",
            **task_options,
        }
        wrapped = task(**options)(body)
        wrapped.stage = stage  # type: ignore[attr-defined]
        return wrapped


@dataclass(frozen=True)
class Call:
    """One call of a stage: its task, a label for people, JSON parameters and the key,
    computed once (``None`` when the inputs cannot be keyed, e.g. a missing directory:
    the task then reports why)."""

    task: Any
    label: str
    params: dict[str, Any]
    identity: dict | None

    @property
    def stage(self) -> Stage:
        return self.task.stage

    @property
    def key(self) -> str | None:
        return None if self.identity is None else stable_hash(self.identity)


def call(task: Any, label: str, /, **params: Any) -> Call:
    """A call of the stage behind ``task`` with ``params`` (typed references allowed)."""
    params = plain(params)
    args = task.stage.arguments(params)  # a wrong parameter is a bug, not bad input
    try:
        identity = task.stage.identity(args)
    except Exception:  # the task itself reports bad input, in one line
        identity = None
    return Call(task, label, params, identity)


def for_call(c: Call, store: ArtifactStore) -> Any:
    """The call's task if its record is in the store, else a copy that ignores (and
    refreshes) Prefect's cached result: the store is the source of truth."""
    if c.key is not None and c.stage.find(store, c.key, verify="size") is not None:
        return c.task
    return c.task.with_options(refresh_cache=True)


def placement(device: str | None = None) -> dict[str, str]:
    """Where this call runs: the host, the Dask worker's address (or ``pid:N`` outside
    Dask) and the device its models use."""
    import os
    import socket

    worker = f"pid:{os.getpid()}"
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        pass
    return {"host": socket.gethostname(), "worker": worker, "device": device or "cpu"}


def input_error_message(e: InputError) -> str:
    """The one line that reports an expected input error: ``CheckpointError: <message>``."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
