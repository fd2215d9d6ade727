"""Writes the lm-eval test and validation sets from the skill rules:
``lm_tasks/demo_<skill>.jsonl`` (test, what the leaderboard reports) and
``lm_tasks/demo_<skill>_validation.jsonl`` (the proxy split that selection reads).

The two never share a prompt. Word skills draw both from the evaluation side of the word
split (never trained on): the first ``TEST_SIZE`` distinct words are the test set, the next
``VALIDATION_SIZE`` the validation set. ``add`` has only 200 prompts (all trained on, a
memorised skill): a quarter of them is the validation set, the rest the test set.

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
VALIDATION_SIZE = 100
TEST_SEED = 1234
FILES = {"test": "demo_{skill}.jsonl", "validation": "demo_{skill}_validation.jsonl"}


def eval_set_lines(skill: str, split: str = "test") -> list[str]:
    """The jsonl lines (``{"prompt", "answer"}``) of one skill's ``test`` or ``validation`` set."""
    pool = SKILLS[skill].test_set(TEST_SIZE + VALIDATION_SIZE, TEST_SEED)
    if len(pool) == TEST_SIZE + VALIDATION_SIZE:
        test, validation = pool[:TEST_SIZE], pool[TEST_SIZE:]
    else:  # a small prompt space: a quarter of it validates
        n_val = len(pool) // 4
        test, validation = pool[:-n_val], pool[-n_val:]
    examples = {"test": test, "validation": validation}[split]
    return [json.dumps({"prompt": ex.prompt, "answer": ex.answer}) for ex in examples]


def write_eval_sets(out_dir: Path = LM_TASKS_DIR) -> list[Path]:
    """(Re)writes every skill's test and validation file; each appears complete or not at all."""
    written = []
    for skill in SKILLS:
        for split, pattern in FILES.items():
            path = Path(out_dir) / pattern.format(skill=skill)
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("\n".join(eval_set_lines(skill, split)) + "\n")
            os.replace(tmp, path)
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write_eval_sets():
        print(p)
