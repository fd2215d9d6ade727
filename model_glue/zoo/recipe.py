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

ZOO_CODE_VERSION = 1  # bump when the training loop or the saved layout changes


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


# Fine-tunes: lr 3e-4 x 100 steps (tried for mergeability) left the experts weak (add .36,
# next .08); lr 1e-3 x 120 steps gives .89/.995/1.0. Measurements in docs/demo_zoo.md.
_FT = Schedule(steps=120, lr=1e-3, seq_len=32)

ZOO_RECIPE = ZooRecipe(
    shape=ModelShape(),
    bases=(
        BaseModel(
            "base-a",
            init_seed=1,
            data_seed=11,
            schedule=Schedule(steps=600, lr=3e-3),
            skill_mix=0.10,
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
        FineTune("add-a", "base-a", ("add",), data_seed=101, schedule=_FT),
        FineTune("add-a2", "base-a", ("add",), data_seed=102, schedule=_FT),
        FineTune("next-a", "base-a", ("next",), data_seed=103, schedule=_FT),
        FineTune("last-a", "base-a", ("last",), data_seed=104, schedule=_FT),
        FineTune(
            "noisy-a", "base-a", ("add", "next", "last"), data_seed=105, schedule=_FT, corrupt=True
        ),
        FineTune("add-b", "base-b", ("add",), data_seed=106, schedule=_FT),
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
