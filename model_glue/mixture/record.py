"""The ``mixture.json`` record every mixture directory carries (importable without torch)."""

from __future__ import annotations

import json
from pathlib import Path

from model_glue.mixture.errors import MixtureError

MIXTURE_FILE = "mixture.json"


def read_record(path: str | Path, kinds: list[str]) -> dict:
    """The directory's record; its ``kind`` must be one of ``kinds``."""
    file = Path(path) / MIXTURE_FILE
    if not file.exists():
        raise MixtureError(f"{path}: no {MIXTURE_FILE} (not a mixture directory)")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise MixtureError(f"{file}: invalid JSON ({e})") from e
    if record.get("format") != "model-glue-mixture" or record.get("kind") not in kinds:
        raise MixtureError(
            f"{file}: kind {record.get('kind')!r} unknown (allowed: {', '.join(kinds)})"
        )
    if record.get("version") != 1:
        raise MixtureError(f"{file}: version {record.get('version')!r} unsupported (expected 1)")
    return record
