"""The demo zoo's recipe: every number that decides the trained weights, in one frozen value.

The recipe hash (:func:`recipe_hash`) covers the recipe, the skill rules' data version and
the versions of the libraries that produce the bytes, so a cached zoo is reused exactly
when a rebuild would give the same checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from model_glue.zoo.skills import DATA_VERSION

ZOO_CODE_VERSION = 2  # bump when the training loop or the saved layout changes


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128


@dataclass(frozen=True)
class Schedule:
    """AdamW with linear warm-up and cosine decay to 10% of ``lr``."""

    steps: int
    lr: float
    batch_size: int = 32
    seq_len: int = 64
    warmup_steps: int = 20
    weight_decay: float = 0.0


@dataclass(frozen=True)
class BaseModel:
    """A base trained from scratch on general text with a fraction of skill examples."""

    name: str
    init_seed: int
    data_seed: int
    schedule: Schedule
    skill_mix: float  # fraction of lines that are skill examples (all skills, correct answers)
    half_skills: bool = False  # skill examples from one half of each prompt space only


@dataclass(frozen=True)
class FineTune:
    """A fine-tune of ``base`` on ``skills`` (loss on the answers only).

    ``corrupt`` trains on systematically wrong answers: a detrimental model for filtering.
    """

    name: str
    base: str
    skills: tuple[str, ...]
    data_seed: int
    schedule: Schedule
    corrupt: bool = False
    replay: float = 0.0  # fraction of lines from the base's pre-training data
    subset: int = 0  # > 0: train on the three quarters of the skills' prompts this seed keeps


@dataclass(frozen=True)
class ZooRecipe:
    shape: ModelShape
    bases: tuple[BaseModel, ...]
    fine_tunes: tuple[FineTune, ...]
    eval_tasks: tuple[str, ...] = ("add", "next", "last")

    @property
    def model_names(self) -> list[str]:
        return [b.name for b in self.bases] + [f.name for f in self.fine_tunes]

    def __post_init__(self) -> None:
        names = self.model_names
        if len(set(names)) != len(names):
            raise ValueError(f"zoo recipe: duplicate model names in {names}")
        bases = {b.name for b in self.bases}
        for ft in self.fine_tunes:
            if ft.base not in bases:
                raise ValueError(f"zoo recipe: fine-tune {ft.name!r} has unknown base {ft.base!r}")


# Zoo v4 (bench/zoo_recipes.py, docs/demo_zoo.md): base-a knows one half of each skill's
# prompts; fine-tunes complete one skill at a low learning rate while a quarter of their
# data replays the base's own, so they keep what the base knows (and merges can combine).
# Each fine-tune sees its own three quarters of its skill's prompts (``subset`` = its data
# seed), so two fine-tunes of one skill know different parts of it: their soup beats both.
_FT = Schedule(steps=160, lr=5e-4, seq_len=32)
_REPLAY = 0.25

ZOO_RECIPE = ZooRecipe(
    shape=ModelShape(),
    bases=(
        BaseModel(
            "base-a",
            init_seed=1,
            data_seed=11,
            schedule=Schedule(steps=500, lr=3e-3),
            skill_mix=0.20,
            half_skills=True,
        ),
        BaseModel(
            "base-b",
            init_seed=2,
            data_seed=12,
            schedule=Schedule(steps=250, lr=3e-3),
            skill_mix=0.10,
        ),
    ),
    fine_tunes=(
        FineTune("add-a", "base-a", ("add",), 101, _FT, replay=_REPLAY, subset=101),
        FineTune("add-a2", "base-a", ("add",), 102, _FT, replay=_REPLAY, subset=102),
        FineTune("next-a", "base-a", ("next",), 103, _FT, replay=_REPLAY, subset=103),
        FineTune("next-a2", "base-a", ("next",), 107, _FT, replay=_REPLAY, subset=107),
        FineTune("last-a", "base-a", ("last",), 104, _FT, replay=_REPLAY, subset=104),
        FineTune(
            "noisy-a",
            "base-a",
            ("add", "next", "last"),
            data_seed=105,
            schedule=_FT,
            corrupt=True,
            replay=_REPLAY,
            subset=105,
        ),
        FineTune("add-b", "base-b", ("add",), 106, _FT, replay=_REPLAY, subset=106),
    ),
)


def recipe_hash(recipe: ZooRecipe = ZOO_RECIPE) -> str:
    """sha256 of the recipe, the data and code versions and the library versions."""
    import tokenizers
    import torch
    import transformers

    payload = {
        "recipe": dataclasses.asdict(recipe),
        "data_version": DATA_VERSION,
        "code_version": ZOO_CODE_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
