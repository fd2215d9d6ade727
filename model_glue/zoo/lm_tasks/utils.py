"""Loader for the demo tasks' local jsonl files.

lm-eval hands relative ``data_files`` to ``datasets.load_dataset``, which resolves them
against the current working directory, so the yaml files instead name this loader
(``custom_dataset``): it resolves the file next to this module, whatever the cwd, and
builds the dataset in memory (no download, no datasets cache).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_demo_split(
    data_file: str, validation_file: str | None = None, **_metadata: object
) -> datasets.DatasetDict:
    """A ``test`` split from ``data_file`` and a ``validation`` split from
    ``validation_file`` (jsonl names relative to this folder)."""
    splits = {"test": data_file} | ({"validation": validation_file} if validation_file else {})
    return datasets.DatasetDict({name: _rows(file) for name, file in splits.items()})


def _rows(data_file: str) -> datasets.Dataset:
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(f"demo task data {path} is missing")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.Dataset.from_list(rows)
