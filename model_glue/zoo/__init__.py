"""The demo zoo: small real Llama checkpoints trained on CPU, and their lm-eval tasks."""

from model_glue.zoo.builder import build_demo_zoo, is_current
from model_glue.zoo.recipe import (
    ZOO_RECIPE,
    BaseModel,
    FineTune,
    ModelShape,
    Schedule,
    ZooRecipe,
    recipe_hash,
)

__all__ = [
    "ZOO_RECIPE",
    "BaseModel",
    "FineTune",
    "ModelShape",
    "Schedule",
    "ZooRecipe",
    "build_demo_zoo",
    "is_current",
    "recipe_hash",
]
