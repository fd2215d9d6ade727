"""A local stand-in for the Hugging Face Hub's HTTP API, for tests of :mod:`model_glue.hub`.

:class:`HubStub` serves an in-memory set of model repos on ``127.0.0.1`` (a threaded
``http.server`` on a free port) and answers the requests that ``huggingface_hub`` 2.4 makes
for ``model_info``, ``list_models``, ``list_repo_tree`` (``snapshot_download``'s listing) and
file downloads, with the headers and error codes that it maps to its own exceptions::

    with HubStub() as hub:
        sha = hub.add_repo("org/base", tiny_model_dir)          # main -> first commit
        hub.add_repo("org/ft", ft_dir, base_model="org/base", downloads=10)
        hub.add_repo("org/secret", ft_dir, private=True, tokens=["hf_good"])
        hub.add_token("hf_other")                                 # valid, no access
        new = hub.push("org/ft", {"model.safetensors": b"..."})  # main -> new commit
        hub.tag("org/ft", "v1", sha)
        resolve("org/ft", endpoint=hub.endpoint)
        hub.file_gets("org/ft")        # files GET from /resolve/ since the last reset
        hub.requests                   # Counter of (method, path)

Endpoints (``{rev}``: a branch, a tag or a full commit sha, percent-encoded as the client
sends it):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: the model info
  (``sha``, ``siblings``; with ``blobs=true`` each sibling has ``blobId``, ``size`` and, for
  LFS files, ``lfs: {sha256, size, pointerSize}``; ``tags`` with the model tree's
  ``base_model:{id}`` and ``base_model:{relation}:{id}``; ``cardData.base_model``).
- ``GET /api/models?filter=&author=&search=&sort=&limit=&expand=``: ``list_models``. Every
  ``filter`` must be one of a model's tags (the real hub's semantics), ``search`` is a
  case-insensitive substring of the id, ``sort`` is descending (ties by id).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the tree (``recursive=true`` lists every
  file), in the format of ``RepoFile``/``RepoFolder``; one page, no ``Link`` header.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{filename}``: ``X-Repo-Commit``, ``ETag`` (the git
  blob id; the LFS sha256 for LFS files, with ``X-Linked-Etag`` and ``X-Linked-Size`` as
  the hub sends them), ``Content-Length``. No redirects, no Xet.

Access, as the real hub answers it: a private repo is invisible without a token that may
read it (401 ``RepoNotFound`` anonymously, 404 ``RepoNotFound`` with a token); a gated
repo's metadata is public but its files need a token with access (401 ``GatedRepo``
anonymously, 403 ``GatedRepo`` with another valid token); a token that is neither granted
a repo nor added (``add_token``) is a 401 with
``X-Error-Message: Invalid credentials in Authorization header``; a missing repo is 401
(anonymous) / 404 ``RepoNotFound``, a missing revision 404 ``RevisionNotFound``, a missing
file 404 ``EntryNotFound``. ``outage = 503`` answers every request with that status.

A file is stored in LFS when its name matches :data:`LFS_PATTERNS` or it is larger than
10 MB, as the hub's default ``.gitattributes`` does.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.model", "*.gguf", "*.h5")
LFS_THRESHOLD = 10 * 1024 * 1024
RELATIONS = ("finetune", "adapter", "merge", "quantized")
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
# list_models' sort names -> the model's JSON field
_SORT_FIELDS = {
    "downloads": "downloads",
    "likes": "likes",
    "createdAt": "createdAt",
    "lastModified": "lastModified",
    "trendingScore": "trendingScore",
}


def read_dir(path: str | Path) -> dict[str, bytes]:
    """Every file under ``path`` (recursively), by its ``/``-separated relative name."""
    root = Path(path)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StubFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The git LFS pointer that git stores in place of an LFS file."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {len(self.data)}\n"
        ).encode()

    @property
    def blob_id(self) -> str:
        return git_blob_id(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class StubCommit:
    sha: str
    files: dict[str, StubFile]
    date: datetime


@dataclass
class StubRepo:
    id: str
    commits: list[StubCommit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False
    tokens: set[str] = field(default_factory=set)
    base_models: dict[str, str] = field(default_factory=dict)  # base id -> relation
    extra_tags: list[str] = field(default_factory=list)
    downloads: int = 0
    likes: int = 0
    trending_score: int = 0
    created_at: datetime = _EPOCH

    def commit(self, rev: str) -> StubCommit | None:
        sha = self.branches.get(rev) or self.tags.get(rev) or rev
        return next((c for c in self.commits if c.sha == sha), None)

    @property
    def tag_list(self) -> list[str]:
        tags = ["transformers", "safetensors", *self.extra_tags]
        for base, relation in self.base_models.items():
            tags += [f"base_model:{base}", f"base_model:{relation}:{base}"]
        return tags


class HubStub:
    """The hub on ``127.0.0.1``: a context manager; ``endpoint`` is its URL."""

    def __init__(self) -> None:
        self.repos: dict[str, StubRepo] = {}
        self.tokens: set[str] = set()  # valid tokens (besides those granted a repo)
        self.requests: Counter[tuple[str, str]] = Counter()
        self.outage: int | None = None
        self._lock = threading.Lock()
        self._clock = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> HubStub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.stub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut the server down (later requests fail to connect: the hub is unreachable)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "HubStub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- content --------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | str | Path,
        *,
        private: bool = False,
        gated: bool = False,
        tokens: Iterable[str] = (),
        base_model: str | Iterable[str] | None = None,
        relation: str = "finetune",
        tags: Iterable[str] = (),
        downloads: int = 0,
        likes: int = 0,
        trending_score: int = 0,
    ) -> str:
        """A new repo whose ``main`` holds ``files`` (a name -> bytes mapping or a local
        model directory); returns the commit sha. ``tokens`` may read a private or gated
        repo; ``base_model`` puts it in the model tree of those bases as a ``relation``
        (finetune, adapter, merge, quantized)."""
        assert repo_id not in self.repos, f"{repo_id} exists"
        assert relation in RELATIONS, relation
        bases = [base_model] if isinstance(base_model, str) else list(base_model or ())
        with self._lock:
            self._clock += 1
            repo = StubRepo(
                id=repo_id,
                private=private,
                gated=gated,
                tokens=set(tokens),
                base_models=dict.fromkeys(bases, relation),
                extra_tags=list(tags),
                downloads=downloads,
                likes=likes,
                trending_score=trending_score,
                created_at=_EPOCH + timedelta(days=self._clock),
            )
            self.repos[repo_id] = repo
        return self._commit(repo, _as_files(files), "main")

    def push(
        self,
        repo_id: str,
        files: Mapping[str, bytes | None] | str | Path,
        *,
        branch: str = "main",
    ) -> str:
        """A new commit on ``branch`` (created from ``main`` if new); returns its sha.
        A mapping changes those files (``None`` deletes one) and keeps the others; a
        directory replaces the whole tree."""
        repo = self.repos[repo_id]
        if isinstance(files, Mapping):
            head = repo.commit(repo.branches.get(branch, repo.branches["main"]))
            tree = {name: f.data for name, f in head.files.items()} if head else {}
            for name, data in files.items():
                if data is None:
                    tree.pop(name, None)
                else:
                    tree[name] = data
        else:
            tree = read_dir(files)
        return self._commit(repo, tree, branch)

    def tag(self, repo_id: str, name: str, revision: str = "main") -> str:
        """Tag ``revision`` (a branch, tag or commit) as ``name``; returns the commit sha."""
        repo = self.repos[repo_id]
        commit = repo.commit(revision)
        assert commit is not None, f"{repo_id}: no revision {revision}"
        repo.tags[name] = commit.sha
        return commit.sha

    def grant(self, repo_id: str, token: str) -> None:
        """Let ``token`` read the private or gated ``repo_id``."""
        self.repos[repo_id].tokens.add(token)

    def add_token(self, token: str) -> None:
        """A valid token (of an account) that may read no private or gated repo yet."""
        self.tokens.add(token)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def _commit(self, repo: StubRepo, tree: Mapping[str, bytes], branch: str) -> str:
        with self._lock:
            self._clock += 1
            parent = repo.branches.get(branch, "")
            stored = {
                name: StubFile(data, _is_lfs(name, data)) for name, data in sorted(tree.items())
            }
            digest = hashlib.sha1(f"{repo.id}\n{parent}\n{self._clock}\n".encode())
            for name, f in stored.items():
                digest.update(f"{name} {f.blob_id}\n".encode())
            commit = StubCommit(digest.hexdigest(), stored, _EPOCH + timedelta(days=self._clock))
            repo.commits.append(commit)
            repo.branches[branch] = commit.sha
        return commit.sha

    # --- request counts -------------------------------------------------------------------

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, method: str | None = None, contains: str = "") -> int:
        """How many requests (of ``method``, whose path contains ``contains``) were served."""
        with self._lock:
            return sum(
                n
                for (m, path), n in self.requests.items()
                if (method is None or m == method) and contains in path
            )

    def file_gets(self, repo_id: str | None = None) -> list[str]:
        """The file names downloaded (``GET .../resolve/...``), sorted, with repeats."""
        prefix = f"/{repo_id}/resolve/" if repo_id else None
        out: list[str] = []
        with self._lock:
            for (method, path), n in self.requests.items():
                if method != "GET" or "/resolve/" not in path or path.startswith("/api/"):
                    continue
                if prefix and not path.startswith(prefix):
                    continue
                filename = unquote(path.split("/resolve/", 1)[1].partition("/")[2])
                out += [filename] * n
        return sorted(out)

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests[(method, path)] += 1


def _as_files(files: Mapping[str, bytes] | str | Path) -> dict[str, bytes]:
    return dict(files) if isinstance(files, Mapping) else read_dir(files)


def _is_lfs(name: str, data: bytes) -> bool:
    base = name.rsplit("/", 1)[-1]
    return len(data) > LFS_THRESHOLD or any(fnmatchcase(base, p) for p in LFS_PATTERNS)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Reply(Exception):
    """An error answer: status, X-Error-Code, message, extra headers."""

    def __init__(self, status: int, code: str | None, message: str, **headers: str):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class _Handler(BaseHTTPRequestHandler):
    server_version = "HubStub/1.0"

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence the access log
        pass

    @property
    def stub(self) -> HubStub:
        return self.server.stub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    # --- dispatch -------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        self.stub._record(method, path)
        try:
            if self.stub.outage:
                raise _Reply(self.stub.outage, None, "The hub is down for maintenance")
            token = self._token()
            if path.rstrip("/") == "/api/models":
                return self._json(method, self._list_models(query, token))
            if path.startswith("/api/models/"):
                rest = path[len("/api/models/") :]
                if "/revision/" in rest:
                    repo_id, rev = rest.split("/revision/", 1)
                    return self._json(method, self._model_info(repo_id, unquote(rev), query, token))
                if "/tree/" in rest:
                    repo_id, tail = rest.split("/tree/", 1)
                    rev, _, sub = tail.partition("/")
                    tree = self._tree(repo_id, unquote(rev), unquote(sub), query, token)
                    return self._json(method, tree)
                return self._json(method, self._model_info(rest, "main", query, token))
            if "/resolve/" in path:
                repo_id, tail = path[1:].split("/resolve/", 1)
                rev, _, filename = tail.partition("/")
                return self._file(method, repo_id, unquote(rev), unquote(filename), token)
            raise _Reply(404, None, f"Sorry, we can't find the page you are looking for: {path}")
        except _Reply as r:
            self._error(method, r)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        known = self.stub.tokens.union(*(repo.tokens for repo in self.stub.repos.values()))
        if token not in known:
            raise _Reply(401, None, "Invalid credentials in Authorization header")
        return token

    # --- access ---------------------------------------------------------------------------

    def _repo(self, repo_id: str, token: str | None, *, files: bool = False) -> StubRepo:
        repo = self.stub.repos.get(repo_id)
        if repo is None or (repo.private and token not in repo.tokens):
            raise _Reply(404 if token else 401, "RepoNotFound", "Repository not found")
        if files and repo.gated and token not in repo.tokens:
            if token is None:
                raise _Reply(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in.",
                )
            raise _Reply(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list.",
            )
        return repo

    def _commit(self, repo: StubRepo, rev: str) -> StubCommit:
        commit = repo.commit(rev)
        if commit is None:
            raise _Reply(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    # --- API ------------------------------------------------------------------------------

    def _model_json(self, repo: StubRepo, commit: StubCommit, *, blobs: bool) -> dict:
        siblings = []
        for name, f in commit.files.items():
            sib: dict = {"rfilename": name}
            if blobs:
                sib.update(blobId=f.blob_id, size=len(f.data))
                if f.lfs:
                    sib["lfs"] = {
                        "sha256": f.sha256,
                        "size": len(f.data),
                        "pointerSize": len(f.pointer),
                    }
            siblings.append(sib)
        card = {"base_model": list(repo.base_models)} if repo.base_models else {}
        return {
            "_id": hashlib.md5(repo.id.encode()).hexdigest()[:24],
            "id": repo.id,
            "modelId": repo.id,
            "author": repo.id.split("/")[0] if "/" in repo.id else None,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": repo.downloads,
            "likes": repo.likes,
            "trendingScore": repo.trending_score,
            "library_name": "transformers",
            "tags": repo.tag_list,
            "pipeline_tag": "text-generation",
            "cardData": card,
            "siblings": siblings,
        }

    def _model_info(self, repo_id: str, rev: str, query: dict, token: str | None) -> dict:
        repo = self._repo(repo_id, token)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        data = self._model_json(repo, self._commit(repo, rev), blobs=blobs)
        expand = query.get("expand")
        if expand:
            data = {k: v for k, v in data.items() if k in {"_id", "id", *expand}}
        return data

    def _list_models(self, query: dict, token: str | None) -> list[dict]:
        filters = query.get("filter", [])
        author = query.get("author", [None])[0]
        search = (query.get("search", [""])[0]).lower()
        sort = query.get("sort", [None])[0]
        limit = int(query.get("limit", ["1000"])[0])
        expand = query.get("expand")
        models = []
        for repo in self.stub.repos.values():
            if repo.private and token not in repo.tokens:
                continue
            if author and repo.id.split("/")[0] != author:
                continue
            if search and search not in repo.id.lower():
                continue
            if not all(f in repo.tag_list for f in filters):
                continue
            data = self._model_json(repo, self._commit(repo, "main"), blobs=False)
            data.pop("siblings")
            data.pop("cardData")
            models.append(data)
        models.sort(key=lambda m: m["id"])
        if sort:
            if sort not in _SORT_FIELDS:
                raise _Reply(400, None, f"Invalid sort parameter: {sort}")
            models.sort(key=lambda m: m[_SORT_FIELDS[sort]], reverse=True)  # stable: ties by id
        if expand:
            models = [{k: v for k, v in m.items() if k in {"_id", "id", *expand}} for m in models]
        return models[:limit]

    def _tree(self, repo_id: str, rev: str, sub: str, query: dict, token: str | None) -> list:
        repo = self._repo(repo_id, token)
        commit = self._commit(repo, rev)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        entries, folders = [], set()
        for name, f in commit.files.items():
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix) :]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    folders.add(prefix + "/".join(parts[:i]))
            if len(parts) > 1 and not recursive:
                continue
            entry = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
            entries.append(entry)
        if sub.strip("/") and not entries and not folders:
            raise _Reply(404, "EntryNotFound", f"{sub} does not exist on {rev}")
        dirs = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        return dirs + entries

    def _file(self, method: str, repo_id: str, rev: str, filename: str, token: str | None) -> None:
        repo = self._repo(repo_id, token, files=True)
        commit = self._commit(repo, rev)
        f = commit.files.get(filename)
        if f is None:
            raise _Reply(
                404, "EntryNotFound", f"{filename} does not exist", **{"X-Repo-Commit": commit.sha}
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(f.data)),
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{f.etag}"',
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(len(f.data))
        self._send(method, 200, headers, f.data)

    # --- responses ------------------------------------------------------------------------

    def _json(self, method: str, data) -> None:
        body = json.dumps(data).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self._send(method, 200, headers, body)

    def _error(self, method: str, r: _Reply) -> None:
        body = json.dumps({"error": r.message}).encode()
        headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "X-Error-Message": r.message,
            **r.headers,
        }
        if r.code:
            headers["X-Error-Code"] = r.code
        self._send(method, r.status, headers, body)

    def _send(self, method: str, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)
