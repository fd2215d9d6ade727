"""Content-addressed artifact store over fsspec: addressing, reading and verifying.

Layout: ``<root>/<kind>/<key>/`` holds an artifact's files and ``MANIFEST.json``. The manifest
is the commit point: a directory without one is an unfinished write and is never read.
Locally a whole artifact appears at once (``os.rename`` of a staging directory under
``<root>/.tmp/``); on object stores the files are uploaded first and the manifest last.
Artifacts are never modified after commit, which is what lets a flow skip a stage whose
output key already exists, survive ``kill -9`` mid-write and run twice concurrently.
How a write is committed: ``storage.commit``; what killed writers leave: ``storage.sweep``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from model_glue.env import glue_home
from storage.commit import (
    STORAGE_ERRNOS,
    TMP_DIR,
    commit_local,
    commit_remote,
    local_copy_matches,
    new_staging,
    rename_into_place,
    write_error,
)
from storage.manifest import (
    MANIFEST_NAME,
    ArtifactCorruptError,
    ArtifactNotFoundError,
    Manifest,
    StoreError,
    build_manifest,
    sha256_file,
    sha256_stream,
    validate_key,
    validate_kind,
)
from storage.sweep import sweep_tmp

JSON_FILE = "data.json"
Verify = Literal["none", "size", "hash"]


class ArtifactStore:
    """Artifacts addressed by ``(kind, key)``, where ``key`` is a hex content address.

    ``url`` is a local path or any fsspec URL (``file://``, ``memory://``, ``s3://``...);
    ``storage_options`` go to the fsspec filesystem. Remote artifacts are downloaded on
    demand into ``cache_dir`` (default ``<GLUE_HOME>/artifact_cache/<hash of url>``)
    because consumers such as ``from_pretrained`` need local directories.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        **storage_options: Any,
    ) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(root)
            os.makedirs(os.path.join(self.root, TMP_DIR), exist_ok=True)
        else:
            self.root = root.rstrip("/")
        url_id = hashlib.sha256(self.fs.unstrip_protocol(self.root).encode()).hexdigest()[:16]
        self.cache_dir = (
            Path(cache_dir) if cache_dir is not None else glue_home() / "artifact_cache" / url_id
        )

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # ---- addressing -------------------------------------------------------------------
    def _path(self, kind: str, key: str, name: str | None = None) -> str:
        p = f"{self.root}/{validate_kind(kind)}/{validate_key(key)}"
        return p if name is None else f"{p}/{name}"

    def uri(self, kind: str, key: str) -> str:
        """Where artifact ``(kind, key)`` lives: a plain path locally, else a full URL."""
        p = self._path(kind, key)
        return p if self.is_local else self.fs.unstrip_protocol(p)

    # ---- reading ----------------------------------------------------------------------
    def manifest(self, kind: str, key: str) -> Manifest:
        path = self._path(kind, key, MANIFEST_NAME)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"no complete artifact {kind}/{key} in {self.url} (no {MANIFEST_NAME})"
            ) from None
        m = Manifest.from_json(raw, where=self.fs.unstrip_protocol(path))
        if (m.kind, m.key) != (kind, key):
            raise ArtifactCorruptError(
                f"{self.uri(kind, key)}/{MANIFEST_NAME}: manifest is for {m.kind}/{m.key}",
                file=MANIFEST_NAME,
            )
        return m

    def verify(self, kind: str, key: str, *, full: bool = True) -> Manifest:
        """Check every file against the manifest: presence and size, and sha256 if ``full``.

        Raises ``ArtifactCorruptError`` naming the first file that does not match.
        """
        m = self.manifest(kind, key)
        base = self._path(kind, key)
        where = self.uri(kind, key)
        found = {
            p[len(base) + 1 :]: info.get("size")
            for p, info in self.fs.find(base, detail=True).items()
            if info.get("type", "file") == "file"
        }
        found.pop(MANIFEST_NAME, None)
        for e in m.files:
            if e.name not in found:
                raise ArtifactCorruptError(
                    f"{where}/{e.name}: file listed in the manifest is missing", file=e.name
                )
            if found[e.name] != e.size:
                raise ArtifactCorruptError(
                    f"{where}/{e.name}: size {found[e.name]} bytes, manifest says {e.size}",
                    file=e.name,
                )
        extra = sorted(found.keys() - {e.name for e in m.files})
        if extra:
            raise ArtifactCorruptError(
                f"{where}/{extra[0]}: file not listed in the manifest", file=extra[0]
            )
        if full:
            for e in m.files:
                with self.fs.open(f"{base}/{e.name}", "rb") as f:
                    digest = sha256_stream(f)
                if digest != e.sha256:
                    raise ArtifactCorruptError(
                        f"{where}/{e.name}: sha256 {digest[:12]}... does not match the manifest "
                        f"({e.sha256[:12]}...)",
                        file=e.name,
                    )
        return m

    def exists(self, kind: str, key: str, *, verify: Verify = "size") -> bool:
        """True when the artifact is committed and passes the requested check.

        ``"size"`` never re-reads file contents, so it is cheap enough for every cache probe;
        ``"hash"`` re-hashes everything (use it when inputs may have been tampered with).
        """
        if verify not in ("none", "size", "hash"):
            raise ValueError(f"verify must be 'none', 'size' or 'hash', not {verify!r}")
        try:
            if verify == "none":
                self.manifest(kind, key)
            else:
                self.verify(kind, key, full=verify == "hash")
        except (ArtifactNotFoundError, ArtifactCorruptError):
            return False
        return True

    def list(self, kind: str | None = None) -> list[tuple[str, str]]:
        """Committed artifacts as sorted ``(kind, key)`` pairs."""
        pattern = f"{self.root}/{validate_kind(kind) if kind else '*'}/*/{MANIFEST_NAME}"
        out = []
        for p in self.fs.glob(pattern):
            k, key = p[len(self.root) + 1 :].split("/")[:2]
            if not k.startswith("."):
                out.append((k, key))
        return sorted(out)

    def get_json(self, kind: str, key: str) -> Any:
        m = self.manifest(kind, key)
        path = self._path(kind, key, JSON_FILE)
        try:
            entry = m.file(JSON_FILE)
        except KeyError:
            raise StoreError(
                f"{self.uri(kind, key)}: not a JSON artifact (no {JSON_FILE})"
            ) from None
        raw = self.fs.cat_file(path)
        if hashlib.sha256(raw).hexdigest() != entry.sha256:
            raise ArtifactCorruptError(
                f"{self.uri(kind, key)}/{JSON_FILE}: sha256 does not match the manifest",
                file=JSON_FILE,
            )
        return json.loads(raw)

    def published_path(self, kind: str, key: str) -> Path:
        """Where an artifact of a local store lives once written, whether it exists yet or
        not (for references computed before publication)."""
        if not self.is_local:
            raise StoreError(f"{self.url}: not a local store")
        return Path(self._path(kind, key))

    def local_path(self, kind: str, key: str) -> Path:
        """A local directory holding the artifact's files (a verified copy for remote stores)."""
        m = self.verify(kind, key, full=False)
        if self.is_local:
            return Path(self._path(kind, key))
        cached = self.cache_dir / kind / key
        try:
            if (
                Manifest.from_json(
                    (cached / MANIFEST_NAME).read_bytes(), where=str(cached)
                ).content_hash
                == m.content_hash
            ):
                return cached
        except (FileNotFoundError, ArtifactCorruptError):
            pass
        staging = new_staging(self.cache_dir / TMP_DIR, kind, key)
        try:
            for e in m.files:
                dest = staging / e.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self._path(kind, key, e.name), str(dest))
                if sha256_file(dest) != e.sha256:
                    raise ArtifactCorruptError(
                        f"{self.uri(kind, key)}/{e.name}: downloaded file does not match the manifest",
                        file=e.name,
                    )
            (staging / MANIFEST_NAME).write_text(m.to_json())
            cached.parent.mkdir(parents=True, exist_ok=True)
            rename_into_place(staging, cached, keep_existing=lambda: local_copy_matches(cached, m))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cached

    # ---- writing ----------------------------------------------------------------------
    @contextmanager
    def writing(self, kind: str, key: str, *, meta: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield a fresh local directory to fill; commit it atomically on a clean exit.

        On an exception nothing is left behind. If a complete artifact with this key already
        exists (a concurrent writer won), it is kept and ours is discarded: content addressing
        makes both equal, and readers may already hold the existing one open.
        """
        validate_kind(kind)
        validate_key(key)
        meta = dict(meta or {})
        try:
            json.dumps(meta)
        except TypeError as e:
            raise StoreError(f"artifact {kind}/{key}: meta is not JSON-serialisable ({e})") from e
        tmp_root = Path(self.root) / TMP_DIR if self.is_local else self.cache_dir / TMP_DIR
        try:
            staging = new_staging(tmp_root, kind, key)
        except OSError as e:
            raise write_error(self.url, kind, key, e) from None
        try:
            yield staging
            manifest = build_manifest(staging, kind, key, meta)
            (commit_local if self.is_local else commit_remote)(self, staging, manifest)
        except OSError as e:
            if e.errno not in STORAGE_ERRNOS:
                raise
            raise write_error(self.url, kind, key, e) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def put_json(self, kind: str, key: str, obj: Any, *, meta: dict[str, Any] | None = None) -> str:
        """Store a small JSON document (cluster assignments, a similarity summary); return its uri."""
        text = json.dumps(obj, indent=1, sort_keys=True)
        with self.writing(kind, key, meta=meta) as d:
            (d / JSON_FILE).write_text(text)
        return self.uri(kind, key)

    # ---- maintenance ------------------------------------------------------------------
    def sweep_tmp(self, older_than_s: float = 3600) -> int:
        """Remove leftovers of killed writers; return how many entries were removed (see
        :func:`storage.sweep.sweep_tmp`)."""
        return sweep_tmp(self, older_than_s)
