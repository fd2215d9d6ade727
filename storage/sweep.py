"""Removing what killed writers left in an artifact store (``ArtifactStore.sweep_tmp``)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from storage.commit import TMP_DIR, host
from storage.manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from storage.artifacts import ArtifactStore


def sweep_tmp(store: ArtifactStore, older_than_s: float = 3600) -> int:
    """Remove leftovers of killed writers; return how many entries were removed.

    Covers staging directories (the store's and the download cache's) whose writer was a
    process of this host that is gone (at once), or of another host and untouched for
    ``older_than_s``, and, on remote stores, artifact directories that never got a
    manifest.
    """
    now = time.time()
    removed = 0
    tmp_roots = [store.cache_dir / TMP_DIR]
    if store.is_local:
        tmp_roots.insert(0, Path(store.root) / TMP_DIR)
    for tmp_root in tmp_roots:
        if not tmp_root.is_dir():
            continue
        for entry in tmp_root.iterdir():
            state = _writer_state(entry.name)
            if state == "alive" or (
                state == "unknown" and now - _newest_mtime(entry) < older_than_s
            ):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    if not store.is_local:
        removed += _sweep_remote_incomplete(store, now, older_than_s)
    return removed


def _sweep_remote_incomplete(store: ArtifactStore, now: float, older_than_s: float) -> int:
    fs, removed = store.fs, 0
    for kind_dir in fs.ls(store.root, detail=False) if fs.exists(store.root) else []:
        if not fs.isdir(kind_dir) or kind_dir.rstrip("/").rsplit("/", 1)[-1].startswith("."):
            continue
        for art_dir in fs.ls(kind_dir, detail=False):
            if not fs.isdir(art_dir) or fs.exists(f"{art_dir}/{MANIFEST_NAME}"):
                continue
            files = fs.find(art_dir, detail=True)
            times = [_info_mtime(i) for i in files.values()]
            if times and all(t is not None and now - t >= older_than_s for t in times):
                fs.rm(art_dir, recursive=True)
                removed += 1
    return removed


def _writer_state(entry_name: str) -> str:
    """``alive`` or ``dead`` for a staging entry written on this host (its pid says), else
    ``unknown`` (another host, or a name without host and pid): only its age tells."""
    parts = entry_name.split("-")
    if len(parts) < 5 or parts[-3] != host():
        return "unknown"
    try:
        os.kill(int(parts[-2]), 0)
    except ValueError:
        return "unknown"
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    return "alive"


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, n)).st_mtime)
                except FileNotFoundError:
                    pass
    return newest


def _info_mtime(info: dict) -> float | None:
    for k in ("mtime", "LastModified", "last_modified", "created", "updated"):
        v = info.get(k)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return v.timestamp()
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None
