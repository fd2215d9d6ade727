"""The architecture catalog: where each family keeps its layers and what each tensor is.

``ARCHITECTURES`` is declared as data (:mod:`.catalog`); :func:`resolve_layout` turns a
checkpoint's config and tensor shapes into a :class:`Layout` (declared, or inferred from
tensor names for an architecture the catalog lacks). No module outside this package knows
a tensor name.
"""

from model_glue.architectures.catalog import (
    ARCHITECTURES,
    MOE_BUILDERS,
    lookup,
    markdown_table,
    moe_families,
)
from model_glue.architectures.layout import (
    GROUPS,
    Layout,
    LayoutError,
    Projection,
    infer_layout,
    layers_path,
    resolve_layout,
)
from model_glue.architectures.spec import Architecture, config_value

__all__ = [
    "ARCHITECTURES",
    "GROUPS",
    "MOE_BUILDERS",
    "Architecture",
    "Layout",
    "LayoutError",
    "Projection",
    "config_value",
    "infer_layout",
    "layers_path",
    "lookup",
    "markdown_table",
    "moe_families",
    "resolve_layout",
]
