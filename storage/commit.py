"""Committing an artifact: a staging directory becomes ``<root>/<kind>/<key>/`` at once.

Locally the staging directory (under ``<root>/.tmp/``) is renamed into place, so a whole
artifact appears at once; on object stores the files are uploaded first and the manifest
last. When two writers of one key collide, a sound artifact already there is kept (content
addressing makes both equal) and a damaged one replaced.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from model_glue.errors import InputError
from storage.manifest import (
    MANIFEST_NAME,
    ArtifactCorruptError,
    ArtifactNotFoundError,
    Manifest,
    StoreError,
)

if TYPE_CHECKING:
    from storage.artifacts import ArtifactStore

TMP_DIR = ".tmp"

# a full disk, a quota, a read-only mount or missing permissions: the store's condition,
# reported in one line that names the store, not as a traceback of whoever was writing
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class StoreWriteError(StoreError, InputError):
    """The store cannot take a write (full, read-only, no permission); nothing was committed."""


def write_error(url: str, kind: str, key: str, e: OSError) -> StoreWriteError:
    what = os.strerror(e.errno) if e.errno else str(e)
    where = f" ({e.filename})" if e.filename else ""
    return StoreWriteError(
        f"store {url}: {what} while writing {kind}/{key[:16]}{where}; nothing was committed"
    )


def host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def new_staging(tmp_root: Path, kind: str, key: str) -> Path:
    tmp_root.mkdir(parents=True, exist_ok=True)
    # host and pid in the name let sweep_tmp spare the staging dirs of live writers
    d = tmp_root / f"{kind}-{key[:16]}-{host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    return d


def commit_local(store: ArtifactStore, staging: Path, manifest: Manifest) -> None:
    (staging / MANIFEST_NAME).write_text(manifest.to_json())
    final = Path(store._path(manifest.kind, manifest.key))
    final.parent.mkdir(parents=True, exist_ok=True)
    rename_into_place(staging, final, keep_existing=lambda: existing_is_sound(store, manifest))


def commit_remote(store: ArtifactStore, staging: Path, manifest: Manifest) -> None:
    kind, key, fs = manifest.kind, manifest.key, store.fs
    if existing_is_sound(store, manifest):
        return
    base, manifest_path = store._path(kind, key), store._path(kind, key, MANIFEST_NAME)
    if fs.exists(manifest_path):  # a damaged artifact: un-commit it before replacing files
        fs.rm(manifest_path)
    for e in manifest.files:
        fs.put_file(str(staging / e.name), store._path(kind, key, e.name))
    # Files a killed upload left that are not ours would fail verification. A concurrent
    # writer of this key uploads the same names (same content), so nothing of it goes.
    ours = {e.name for e in manifest.files}
    for p in fs.find(base):
        if p[len(base) + 1 :] not in ours:
            fs.rm(p)
    # The manifest goes last: until it exists, readers treat the key as absent.
    fs.pipe_file(manifest_path, manifest.to_json().encode())


def existing_is_sound(store: ArtifactStore, manifest: Manifest) -> bool:
    """Is there a committed artifact at this key that we must keep?

    A full hash check, because this runs only when two writers collide or when a caller
    rewrites an artifact it found damaged; a damaged one is replaced, a sound one kept.
    """
    try:
        store.verify(manifest.kind, manifest.key, full=True)
    except ArtifactNotFoundError:
        return False
    except ArtifactCorruptError:
        return False
    return True


def rename_into_place(staging: Path, final: Path, *, keep_existing) -> None:
    """Atomically move ``staging`` to ``final``; keep a sound existing ``final``, replace a bad one."""
    for _ in range(5):
        try:
            os.rename(staging, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if keep_existing():
            return
        # A damaged or unfinished directory holds the name: move it aside atomically, then
        # retry; if another writer moved it first, the rename below fails harmlessly.
        trash = final.parent.parent / TMP_DIR / f"evicted-{final.name[:16]}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    raise StoreError(
        f"could not commit {final}: the directory kept being replaced by other writers"
    )


def local_copy_matches(directory: Path, m: Manifest) -> bool:
    try:
        local = Manifest.from_json((directory / MANIFEST_NAME).read_bytes(), where=str(directory))
    except (FileNotFoundError, ArtifactCorruptError):
        return False
    return local.content_hash == m.content_hash and all(
        (directory / e.name).is_file() and (directory / e.name).stat().st_size == e.size
        for e in m.files
    )
