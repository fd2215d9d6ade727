"""The manifest that makes an artifact directory complete, and the errors of the store.

An artifact is a directory of files plus ``MANIFEST.json``, written last. The manifest lists
every file with its size and sha256, so that a reader can tell a finished artifact from the
leftovers of a killed writer (no manifest) and a damaged one (a file that no longer matches).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
HASH_CHUNK_BYTES = 1 << 20

_KEY_RE = re.compile(r"^[0-9a-f]{8,128}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class StoreError(Exception):
    """Base class of artifact store errors."""


class InvalidKeyError(StoreError, ValueError):
    """A kind or key that cannot be a path component of the store."""


class ArtifactNotFoundError(StoreError, FileNotFoundError):
    """No complete artifact (no manifest) under the requested kind and key."""


class ArtifactCorruptError(StoreError):
    """A committed artifact whose files no longer match its manifest."""

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


def validate_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise InvalidKeyError(
            f"invalid artifact kind {kind!r}: use lowercase letters, digits, '_' or '-', "
            "starting with a letter (at most 64 characters)"
        )
    return kind


def validate_key(key: str) -> str:
    # Keys are content addresses; anything else (a '/', '..', a name) is a caller bug.
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise InvalidKeyError(
            f"invalid artifact key {key!r}: keys are lowercase hex content addresses "
            "of 8 to 128 characters (no '/', '..' or names)"
        )
    return key


def sha256_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(HASH_CHUNK_BYTES):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


@dataclass(frozen=True)
class FileEntry:
    name: str  # relative to the artifact directory, '/'-separated
    size: int
    sha256: str


def content_hash_of(files: tuple[FileEntry, ...] | list[FileEntry]) -> str:
    """Hash over the sorted (name, sha256) pairs: equal for equal content, whatever the meta."""
    h = hashlib.sha256()
    for e in sorted(files, key=lambda e: e.name):
        h.update(f"{e.name}\0{e.sha256}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    kind: str
    key: str
    files: tuple[FileEntry, ...]
    created_at: str  # ISO 8601, UTC
    meta: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)

    def file(self, name: str) -> FileEntry:
        for e in self.files:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": self.format,
                "kind": self.kind,
                "key": self.key,
                "created_at": self.created_at,
                "content_hash": self.content_hash,
                "meta": self.meta,
                "files": [{"name": e.name, "size": e.size, "sha256": e.sha256} for e in self.files],
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str) -> Manifest:
        """Parse a manifest; ``where`` names the file in errors."""
        try:
            d = json.loads(text)
            files = tuple(FileEntry(f["name"], int(f["size"]), f["sha256"]) for f in d["files"])
            m = cls(
                kind=d["kind"],
                key=d["key"],
                files=files,
                created_at=d["created_at"],
                meta=d.get("meta") or {},
                content_hash=d["content_hash"],
                format=int(d.get("format", MANIFEST_FORMAT)),
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ArtifactCorruptError(
                f"{where}: unreadable manifest ({e!r})", file=MANIFEST_NAME
            ) from e
        if m.content_hash != content_hash_of(files):
            raise ArtifactCorruptError(
                f"{where}: manifest content_hash does not match its file list", file=MANIFEST_NAME
            )
        return m


def build_manifest(directory: Path, kind: str, key: str, meta: dict[str, Any]) -> Manifest:
    """Hash every file of a finished local directory (streamed, so model files stay on disk)."""
    entries: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for fn in sorted(filenames):
            path = Path(dirpath) / fn
            rel = path.relative_to(directory).as_posix()
            if path.is_symlink():
                raise StoreError(
                    f"artifact {kind}/{key}: {rel} is a symlink; write real files "
                    "(a link would point outside the store)"
                )
            if rel == MANIFEST_NAME:
                raise StoreError(
                    f"artifact {kind}/{key}: {MANIFEST_NAME} is reserved for the store"
                )
            entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise StoreError(f"artifact {kind}/{key}: {d} is a symlinked directory")
    if not entries:
        raise StoreError(f"artifact {kind}/{key}: nothing was written into the artifact directory")
    files = tuple(sorted(entries, key=lambda e: e.name))
    return Manifest(
        kind=kind,
        key=key,
        files=files,
        created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        meta=meta,
        content_hash=content_hash_of(files),
    )
