"""Storage layer: the content-addressed artifact store and the DuckDB lineage database.

The only code of the project that knows store paths and SQL.
"""

from storage.artifacts import ArtifactStore
from storage.commit import StoreWriteError
from storage.connection import LineageLockedError, ReadOnlyQueryError
from storage.lineage import (
    Artifact,
    Details,
    Headline,
    Lineage,
    LineageDB,
    LineageError,
    default_lineage_path,
)
from storage.manifest import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    FileEntry,
    InvalidKeyError,
    Manifest,
    StoreError,
)

__all__ = [
    "Artifact",
    "Details",
    "Headline",
    "Lineage",
    "ArtifactCorruptError",
    "ArtifactNotFoundError",
    "ArtifactStore",
    "FileEntry",
    "InvalidKeyError",
    "LineageDB",
    "LineageError",
    "LineageLockedError",
    "Manifest",
    "ReadOnlyQueryError",
    "StoreError",
    "StoreWriteError",
    "default_lineage_path",
]
