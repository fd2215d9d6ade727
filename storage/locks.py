"""One computation per stage key, however many runs share a store.

Two ``glue run`` processes on one store (a nightly run and a manual one, or two started by
mistake) would otherwise compute every stage they both need twice: each finds the artifact
missing and starts. A stage therefore holds an exclusive lock on its key while it looks for
its artifact and computes it; the second run blocks on the lock, then finds the artifact the
first one committed and reuses it.

The lock is ``flock`` on ``<store>/.locks/<stage>-<key>.lock``: the kernel releases it when
its holder exits, however it exits (SIGKILL included), so a killed run never blocks the next
one, and no lease expiry is needed. Lock files are never deleted (an unlinked lock file
would let two holders lock two different inodes). This covers processes on one host and
stores on filesystems with working ``flock`` (local disks; NFS v4 maps it to byte-range
locks). On object stores (s3://, gs://) there is no lock: runs there may compute a stage
twice, and the store keeps the first complete copy.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from storage.artifacts import ArtifactStore

LOCK_DIR = ".locks"


@contextmanager
def stage_lock(store: ArtifactStore, stage: str, key: str) -> Iterator[None]:
    """Hold the lock of ``(stage, key)``, waiting for its holder if there is one.
    A no-op on stores without a local filesystem."""
    if not store.is_local:
        yield
        return
    directory = os.path.join(store.root, LOCK_DIR)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, f"{stage}-{key}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the holder finishes, or dies and the kernel frees it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename} {os.getpid()} {time.time():.0f}\n".encode())
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
