"""Merge methods, one module each; importing this package registers them all."""

from model_glue.merge.methods import (  # noqa: F401
    breadcrumbs,
    dare,
    linear,
    model_stock,
    passthrough,
    slerp,
    task_arithmetic,
    ties,
)
