"""Merge methods, one module each; importing this package registers them all."""

from model_glue.merge.methods import (  # noqa: F401
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    passthrough,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
