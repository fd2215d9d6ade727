"""Writes the lm-eval test sets (``lm_tasks/demo_<skill>.jsonl``) from the skill rules.

The jsonl files are shipped with the package (lm-eval reads them, no generation at
evaluation time); this module regenerates them when a rule changes, and the tests check
that the shipped files still equal what the rules produce.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from model_glue.zoo.skills import SKILLS

LM_TASKS_DIR = Path(__file__).parent / "lm_tasks"
TEST_SIZE = 200
TEST_SEED = 1234


def eval_set_lines(skill: str, n: int = TEST_SIZE, seed: int = TEST_SEED) -> list[str]:
    """The jsonl lines (``{"prompt", "answer"}``) of one skill's test set."""
    return [
        json.dumps({"prompt": ex.prompt, "answer": ex.answer})
        for ex in SKILLS[skill].test_set(n, seed)
    ]


def write_eval_sets(out_dir: Path = LM_TASKS_DIR) -> list[Path]:
    """(Re)writes every ``demo_<skill>.jsonl``; each file appears complete or not at all."""
    written = []
    for skill in SKILLS:
        path = Path(out_dir) / f"demo_{skill}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("\n".join(eval_set_lines(skill)) + "\n")
        os.replace(tmp, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_eval_sets():
        print(p)
