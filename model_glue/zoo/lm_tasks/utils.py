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


def load_demo_split(data_file: str, **_metadata: object) -> datasets.DatasetDict:
    """A ``test`` split from ``data_file`` (a jsonl name relative to this folder)."""
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(f"demo task data {path} is missing")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
