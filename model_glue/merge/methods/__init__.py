"""Merge methods, one module each; importing this package registers them all."""

from model_glue.merge.methods import (  # noqa: F401
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
