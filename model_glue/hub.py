"""Models on the Hugging Face Hub: a revision resolved to a commit and a local snapshot, the
commit a branch points at now, and the fine-tunes of a base model (the hub's model tree).

Everything goes through ``huggingface_hub`` (its cache layout, its token, its endpoint);
``endpoint=`` points a call at another hub (a mirror, or the tests' stub).

**Which files a snapshot holds** (:func:`select_files`; top-level files only, so that a
repo's ``original/``, ``onnx/`` or ``gguf/`` copies are never fetched):

- weights: ``*.safetensors`` (shards, ``adapter_model.safetensors``) and
  ``*.safetensors.index.json``; Mistral's ``consolidated*.safetensors`` (the same weights
  in another layout) only when the repo has no other safetensors;
- ``config.json``, ``generation_config.json``, ``adapter_config.json`` and the tokenizer
  files (:data:`TOKENIZER_FILES`);
- pickles (``*.bin``, ``*.pt``, ``*.pth``, ``*.bin.index.json``) only with
  ``allow_pickle`` and only when the revision has no safetensors weights; never a trainer's
  own pickles (``training_args.bin``, ``optimizer.pt``, ...).

**sha256** (:attr:`HubModel.files`) is always the sha256 of the file's bytes: for LFS files
(weights, ``tokenizer.model``) the hub's LFS sha256 (online: ``model_info``'s ``lfs``;
offline: the cache's blob name, which is that sha256), for the others (configs, tokenizer
JSON) computed from the downloaded file. Never the git blob id.

**Offline** is ``huggingface_hub``'s own switch, ``huggingface_hub.constants.HF_HUB_OFFLINE``
(set from ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` when ``huggingface_hub`` is imported;
it refuses every request while it is true, so this module reads the same flag instead of
the environment: to switch at run time, set that attribute). Offline, :func:`resolve`
answers from the cache alone: a branch or tag through the cache's ``refs/{revision}``
file, a commit directly; the snapshot must be complete. When the hub is *unreachable*
(connection refused, timeout, HTTP 5xx) and the revision is cached, :func:`resolve` falls
back to the cache too and says so (``HubModel.offline``, a warning); a hub that answers
"not found" or "no access" is never second-guessed by the cache.

Every error is a :class:`HubError` (an :class:`~model_glue.errors.InputError`): one line
naming the repo. No token appears in an error, a log line or a returned object.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NoReturn

from model_glue.checkpoint import TOKENIZER_FILES
from model_glue.errors import InputError

log = logging.getLogger(__name__)

CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.bin.index.json")
# pickles a Trainer leaves beside the weights: never weights, never downloaded
NOT_WEIGHTS = ("training_args.bin", "optimizer.*", "scheduler.*", "rng_state*", "scaler.pt")
SORTS = ("downloads", "likes", "created_at", "last_modified", "trending_score")
# the model tree's relations (tags base_model:{relation}:{base}); "quantized" is left out
# by default: a quantized copy is no merge input
RELATIONS = ("finetune", "adapter", "merge")
_EXPAND = {
    "downloads": "downloads",
    "likes": "likes",
    "created_at": "createdAt",
    "last_modified": "lastModified",
    "trending_score": "trendingScore",
}
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(InputError):
    """A hub repo that cannot be resolved, listed or read; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class HubModel:
    """A hub revision resolved to a commit and its snapshot in the local cache.

    ``revision`` is what was asked (branch, tag or commit), ``commit`` the 40-hex sha it
    pointed at, ``path`` the snapshot directory (``<cache>/models--org--name/snapshots/
    <commit>``, loadable by ``from_pretrained``), ``files`` the downloaded file names and
    their sha256 (see the module docstring), ``offline`` whether the answer came from the
    cache alone (offline mode or an unreachable hub: a branch may have moved since).
    """

    repo: str
    revision: str
    commit: str
    path: Path
    files: dict[str, str] = field(hash=False)
    offline: bool = False

    @property
    def short(self) -> str:
        return self.commit[:7]


def is_offline() -> bool:
    """``huggingface_hub``'s offline switch (``huggingface_hub.constants.HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def select_files(names: Iterable[str], *, allow_pickle: bool = False) -> list[str]:
    """The files of a revision that a snapshot holds (see the module docstring), sorted."""
    root = sorted({n for n in names if "/" not in n})

    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatchcase(name, p) for p in patterns)

    safetensors = [n for n in root if fnmatchcase(n, "*.safetensors")]
    if any(not n.startswith("consolidated") for n in safetensors):
        safetensors = [n for n in safetensors if not n.startswith("consolidated")]
    chosen = set(safetensors)
    chosen |= {n for n in root if fnmatchcase(n, "*.safetensors.index.json")}
    chosen |= {n for n in root if n in CONFIG_FILES or n in TOKENIZER_FILES}
    if allow_pickle and not safetensors:
        chosen |= {n for n in root if matches(n, PICKLE_PATTERNS) and not matches(n, NOT_WEIGHTS)}
    return sorted(chosen)


def _weights(names: Iterable[str]) -> list[str]:
    return [n for n in names if any(fnmatchcase(n, p) for p in _WEIGHT_PATTERNS)]


# --- resolve ---------------------------------------------------------------------------------


def resolve(
    repo: str,
    revision: str = "main",
    *,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    endpoint: str | None = None,
) -> HubModel:
    """Resolve ``repo@revision`` to a commit and make its snapshot complete in the cache.

    Online: one ``model_info`` call gives the commit and the files; the files of
    :func:`select_files` are then fetched by ``snapshot_download`` pinned to that commit
    (so a branch that moves meanwhile cannot mix two commits), into ``cache_dir`` (default:
    ``huggingface_hub``'s, from ``HF_HUB_CACHE``/``HF_HOME``). Files already in the cache
    are not downloaded again: a complete snapshot costs no file request at all, and a new
    commit downloads only the files whose content changed. ``refs/{revision}`` records the
    commit for offline use. ``token``: the argument, else ``huggingface_hub``'s own
    (``HF_TOKEN``, the saved login).
    """
    _check_repo_id(repo)
    revision = _check_revision(repo, revision)
    cache = _cache_dir(cache_dir)
    if is_offline():
        return _from_cache(repo, revision, cache, allow_pickle, "offline mode (HF_HUB_OFFLINE)")

    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:
        reason = _unreachable(exc)
        if reason is None:
            _reraise(exc, repo, revision, api.endpoint)
        try:
            cached = _from_cache(repo, revision, cache, allow_pickle, reason)
        except HubError:
            raise HubError(
                f"{repo}@{revision}: the hub at {api.endpoint} is unreachable ({reason}) and "
                f"the revision is not in the cache {cache}"
            ) from None
        log.warning(
            "hub: %s@%s: the hub is unreachable (%s): using the cached commit %s",
            repo, revision, reason, cached.short,
        )  # fmt: skip
        return cached

    commit = info.sha
    siblings = {s.rfilename: s for s in info.siblings or ()}
    wanted = select_files(siblings, allow_pickle=allow_pickle)
    _require_weights(repo, revision, wanted, siblings, allow_pickle)
    path = _download(repo, revision, commit, wanted, cache, token, endpoint, api.endpoint)
    if revision != commit:
        _write_ref(cache / _folder(repo), revision, commit)
    files = {}
    for name in wanted:
        lfs = siblings[name].lfs
        files[name] = lfs.sha256 if lfs is not None else _sha256(path / name)
    log.info("hub: %s@%s -> %s (%d files)", repo, revision, commit[:7], len(files))
    return HubModel(repo, revision, commit, path, files, offline=False)


def _download(
    repo: str,
    revision: str,
    commit: str,
    wanted: list[str],
    cache: Path,
    token: str | None,
    endpoint: str | None,
    shown_endpoint: str,
) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(
                repo,
                revision=commit,
                cache_dir=cache,
                token=token,
                endpoint=endpoint,
                allow_patterns=[glob.escape(n) for n in wanted],
            )
        )
    except Exception as exc:
        reason = _unreachable(exc)
        if reason is None:
            _reraise(exc, repo, revision, shown_endpoint)
        raise HubError(
            f"{repo}@{revision}: downloading commit {commit[:7]} from {shown_endpoint} failed "
            f"({reason})"
        ) from None
    missing = [n for n in wanted if not (path / n).is_file()]
    if missing:
        raise HubError(
            f"{repo}@{revision}: the snapshot of commit {commit[:7]} in {path} lacks "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    return path


def _require_weights(
    repo: str, revision: str, wanted: list[str], present: Iterable[str], allow_pickle: bool
) -> None:
    if _weights(wanted):
        return
    pickles = [n for n in _weights(n for n in present if "/" not in n) if n not in wanted]
    if pickles and not allow_pickle:
        raise HubError(
            f"{repo}@{revision}: only pickle weights ({', '.join(pickles[:3])}), no "
            "*.safetensors: pickles run code when loaded; allow them explicitly (allow_pickle)"
        )
    raise HubError(f"{repo}@{revision}: no model weights (*.safetensors) in the repo's top level")


# --- the cache alone ---------------------------------------------------------------------


def _from_cache(repo: str, revision: str, cache: Path, allow_pickle: bool, why: str) -> HubModel:
    """``repo@revision`` from the cache alone (huggingface_hub's layout: ``refs/``,
    ``snapshots/<commit>/``, ``blobs/``), or a HubError saying it is not there."""
    storage = cache / _folder(repo)
    if _COMMIT.fullmatch(revision):
        commit = revision
    else:
        ref = storage / "refs" / revision
        if not ref.is_file():
            raise HubError(f"{repo}@{revision}: {why}, and not in the cache {cache}")
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        raise HubError(
            f"{repo}@{revision}: {why}, and commit {commit[:7]} is not in the cache {cache}"
        )
    present = [p.name for p in snapshot.iterdir() if p.is_file()]
    listed = _cached_tree(repo, commit, cache)
    wanted = select_files(listed if listed is not None else present, allow_pickle=allow_pickle)
    missing = [n for n in wanted if n not in present]
    if missing:
        raise HubError(
            f"{repo}@{revision}: {why}, and the cached snapshot of commit {commit[:7]} is "
            f"incomplete (no {', '.join(missing[:3])})"
        )
    _require_weights(repo, revision, wanted, present, allow_pickle)
    files = {name: _cached_sha256(snapshot / name) for name in wanted}
    log.info("hub: %s@%s -> %s from the cache (%s)", repo, revision, commit[:7], why)
    return HubModel(repo, revision, commit, snapshot, files, offline=True)


def _cached_tree(repo: str, commit: str, cache: Path) -> list[str] | None:
    """The commit's file list as ``snapshot_download`` cached it, if it did (older
    huggingface_hub versions cache none: then the snapshot's own files count as complete)."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:
        return None
    try:
        return [f.path for f in get_cached_repo_tree(repo, revision=commit, cache_dir=cache)]
    except CachedRepoTreeNotFoundError:
        return None


def _cached_sha256(path: Path) -> str:
    """The cache names an LFS file's blob by its sha256: read it off the link, else hash."""
    target = Path(os.path.realpath(path)).name
    return target if _SHA256.fullmatch(target) else _sha256(path)


def lookup(
    repo: str,
    revision: str = "main",
    *,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    endpoint: str | None = None,
) -> HubModel:
    """What :func:`resolve` would give, without downloading anything (``glue plan``): the
    cached snapshot of the commit ``revision`` is at now, or, when that commit is not in
    the cache yet, the commit with no files (its files are known once downloaded)."""
    _check_repo_id(repo)
    revision = _check_revision(repo, revision)
    cache = _cache_dir(cache_dir)
    commit = None if is_offline() else latest_commit(repo, revision, token=token, endpoint=endpoint)
    if commit is None:  # offline or unreachable: the cache is all there is
        return _from_cache(repo, revision, cache, allow_pickle, "offline mode (HF_HUB_OFFLINE)")
    try:
        return _from_cache(repo, commit, cache, allow_pickle, "planning")
    except HubError:
        path = cache / _folder(repo) / "snapshots" / commit
        return HubModel(repo, revision, commit, path, {}, offline=False)


# --- latest commit, discovery ------------------------------------------------------------


def latest_commit(
    repo: str,
    revision: str = "main",
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> str | None:
    """The commit ``revision`` (a branch or tag) points at on the hub now; None when offline
    or when the hub is unreachable (logged)."""
    _check_repo_id(repo)
    revision = _check_revision(repo, revision)
    if is_offline():
        return None
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        return api.model_info(repo, revision=revision).sha
    except Exception as exc:
        reason = _unreachable(exc)
        if reason is None:
            _reraise(exc, repo, revision, api.endpoint)
        log.warning("hub: %s@%s: the hub is unreachable (%s)", repo, revision, reason)
        return None


def discover(
    base_model: str,
    *,
    limit: int = 50,
    sort: str = "downloads",
    author: str | None = None,
    search: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    relations: Sequence[str] | None = RELATIONS,
) -> list[str]:
    """The repo ids of the hub's models derived from ``base_model`` (its model tree), the
    ``limit`` first by ``sort`` (descending, as the hub sorts; ties by id).

    The hub tags a model derived from a base with ``base_model:{base}`` and
    ``base_model:{relation}:{base}`` (relation: finetune, adapter, merge, quantized);
    ``list_models(filter=...)`` matches tags. One query per relation of ``relations``
    (default: fine-tunes, adapters, merges; ``None``: one query with the plain tag, every
    relation, quantized copies included), merged. ``author`` keeps one namespace's models,
    ``search`` those whose id contains it. An empty list is a valid answer.
    """
    _check_repo_id(base_model)
    if sort not in SORTS:
        raise HubError(
            f"discover {base_model}: sort must be one of {', '.join(SORTS)}, not {sort!r}"
        )
    if limit < 1:
        raise HubError(f"discover {base_model}: limit must be at least 1, not {limit}")
    unknown = [r for r in relations or () if r not in (*RELATIONS, "quantized")]
    if unknown:
        raise HubError(f"discover {base_model}: unknown model-tree relation {unknown[0]!r}")
    if is_offline():
        raise HubError(
            f"discover {base_model}: offline mode (HF_HUB_OFFLINE): the hub cannot be asked "
            "for its fine-tunes"
        )
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    filters = [f"base_model:{r}:{base_model}" for r in relations] if relations else [
        f"base_model:{base_model}"
    ]  # fmt: skip
    found: dict[str, object] = {}
    try:
        for tag in filters:
            for info in api.list_models(
                filter=tag, author=author, search=search, sort=sort, limit=limit,
                expand=[_EXPAND[sort]],
            ):  # fmt: skip
                found.setdefault(info.id, getattr(info, sort))
    except Exception as exc:
        reason = _unreachable(exc)
        if reason is None:
            _reraise(exc, base_model, None, api.endpoint, what="discover")
        raise HubError(
            f"discover {base_model}: the hub at {api.endpoint} is unreachable ({reason})"
        ) from None
    found.pop(base_model, None)
    ranked = sorted(found.items(), key=lambda kv: kv[0])
    ranked.sort(key=lambda kv: (kv[1] is not None, kv[1] or 0), reverse=True)
    return [repo for repo, _ in ranked[:limit]]


# --- helpers -----------------------------------------------------------------------------


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise HubError(f"{repo!r} is not a hub repo id (org/name)") from None


def _check_revision(repo: str, revision: str | None) -> str:
    """The revision, ``main`` by default; a name that could leave the cache's ``refs/``
    folder is refused."""
    revision = revision or "main"
    if revision.startswith("/") or ".." in revision.split("/"):
        raise HubError(f"{repo}@{revision}: not a branch, tag or commit name")
    return revision


def _cache_dir(cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants

    return (
        Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser().resolve()
    )


def _folder(repo: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=repo, repo_type="model")


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """``refs/{revision}`` -> commit, as huggingface_hub writes it (atomically)."""
    ref = storage / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=ref.parent, prefix=".ref-")
        with os.fdopen(fd, "w") as f:
            f.write(commit)
        os.replace(tmp, ref)
    except OSError as exc:
        log.warning("hub: could not record %s -> %s in %s: %s", revision, commit[:7], ref, exc)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unreachable(exc: BaseException) -> str | None:
    """Why the hub could not be asked (no connection, timeout, 5xx), or None when it answered."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    try:  # huggingface_hub 2 speaks httpx2, 1.x httpx
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError

    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode (HF_HUB_OFFLINE)"
    if isinstance(exc, TransportError):
        return f"{type(exc).__name__}"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        return f"HTTP {status}" if status >= 500 or status in (408, 429) else None
    if isinstance(exc, LocalEntryNotFoundError):
        return "the files could not be fetched"
    return None


def _reraise(
    exc: BaseException, repo: str, revision: str | None, endpoint: str, *, what: str = ""
) -> NoReturn:
    """Raise the one-line HubError for an answer of the hub (the hub's own exception, whose
    response holds the request and its headers, is not chained); other exceptions as is."""
    err = _translate(exc, repo, revision, endpoint, what=what)
    if err is exc:
        raise exc
    raise err from None


def _translate(
    exc: BaseException, repo: str, revision: str | None, endpoint: str, *, what: str = ""
) -> BaseException:
    """The one-line HubError for an answer of the hub; other exceptions pass unchanged."""
    from huggingface_hub.errors import (
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{what} {repo}" if what else (f"{repo}@{revision}" if revision else repo)
    authed = False
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        request = exc.response.request
        authed = request is not None and request.headers.get("authorization") is not None
    how = "token=, HF_TOKEN or `hf auth login`"
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo}: revision {revision!r} not found on {endpoint}")
    if isinstance(exc, GatedRepoError):
        if authed:
            return HubError(
                f"{name}: gated repo, and the token has no access (request it on the hub)"
            )
        return HubError(f"{name}: gated repo: pass a token of an account with access ({how})")
    if isinstance(exc, RepositoryNotFoundError):
        if authed:
            return HubError(
                f"{name}: repository not found on {endpoint}, or private and the token has no access"
            )
        return HubError(
            f"{name}: repository not found on {endpoint} (if it is private, pass a token: {how})"
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401 and authed:
            return HubError(
                f"{name}: the hub at {endpoint} rejected the token (401: invalid or expired)"
            )
        if status == 401:
            return HubError(f"{name}: the hub at {endpoint} asks for a token (401): {how}")
        if status == 403:
            return HubError(f"{name}: access denied by the hub at {endpoint} (403)")
        return HubError(f"{name}: the hub at {endpoint} answered HTTP {status}")
    if isinstance(exc, FileMetadataError):
        return HubError(
            f"{name}: {endpoint} does not answer like a Hugging Face hub (no commit/ETag headers)"
        )
    if isinstance(exc, HFValidationError):
        return HubError(f"{name}: invalid request ({str(exc).splitlines()[0]})")
    return exc
