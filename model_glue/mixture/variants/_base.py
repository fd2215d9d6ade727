"""What a mixture variant declares, and the registry of variants.

A variant is one module of this package that registers a :class:`MixtureVariant`: its
settings (a pydantic model whose ``variant`` field is its name; the run configuration's
``mixture`` section and ``glue mix`` files are validated against it), how it builds and
reopens a mixture directory, and what the pipeline needs to know about it (whether it
routes whole samples, the dtype its models are stored in, how it is evaluated, which
architectures it accepts). The pipeline and ``glue mix`` build through
:func:`build_mixture`; nothing else branches on a variant's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from model_glue.mixture.routers.base import ROUTERS
from model_glue.registry import Registry

if TYPE_CHECKING:
    from torch import nn


class VariantSettings(BaseModel):
    """The keys every variant takes. Subclasses add their own and narrow ``variant`` to a
    ``Literal`` of their name (the tag of the configuration's discriminated union)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str
    # the router that initialises or fits the gates (default: the variant's); see ROUTERS
    router: str | None = None
    # example inputs for routers that need them: per task in a run configuration (each
    # task's prompts go to the expert best at it), per expert in a ``glue mix`` file
    prompts: dict[str, list[str] | dict[str, list[str]]] = {}

    # keys that only the pipeline reads (``glue mix`` refuses them)
    pipeline_only: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> MixtureVariant:
        return VARIANTS[self.variant]

    def router_used(self, fitted: bool = True) -> str:
        """The router: the configured one, else the variant's default (``fitted=False``
        where no proxy labels exist, as in ``glue mix``: the first training-free one)."""
        if self.router is not None:
            return self.router
        default = self.spec.default_router
        return default if fitted or not ROUTERS[default].fitted else "hidden"

    @model_validator(mode="after")
    def _router(self) -> VariantSettings:
        if self.router is None:
            return self
        if self.router not in ROUTERS:
            raise ValueError(
                f"router: unknown router {self.router!r} (allowed: {', '.join(ROUTERS.names())})"
            )
        if ROUTERS[self.router].fitted and not self.spec.routes_samples:
            allowed = [r.name for r in ROUTERS if not r.fitted]
            raise ValueError(
                f"router: {self.router} is fitted for mixtures that route whole samples; "
                f"{self.variant} takes {', '.join(allowed)}"
            )
        return self


@dataclass(frozen=True)
class BuildInputs:
    """What every variant's builder receives (each reads what it needs)."""

    experts: Sequence[str]  # expert directories
    names: Sequence[str]
    backbone: str  # the router's backbone / the base of the shared weights
    out: Path
    router: Any  # RouterInit (training-free) or LinearGate (fitted)
    prompts: Mapping | None = None  # per expert name
    device: str = "cpu"
    dtype: str | None = "float32"
    relative_to: str | Path | None = None  # experts under it are referenced relatively
    location: str | Path | None = None  # where the directory will be published


@dataclass(frozen=True)
class MixtureVariant:
    name: str
    doc: str
    settings: type[VariantSettings]
    build: Callable[[BuildInputs, Any], Path]
    load: Callable[[Path, dict, str, str | None], nn.Module]
    # one whole expert per sample: experts chosen on the proxy split, router accuracy and
    # fitted routers exist only for these
    routes_samples: bool = False
    # the models run in the experts' dtype (else the mixture's weights are float32)
    in_expert_dtype: bool = False
    # evaluated through model-glue's lm-eval model (else transformers loads the directory)
    own_model_class: bool = False
    default_router: str = "hidden"
    # why a model (its config.json) cannot be an expert; None: any architecture
    refusal: Callable[[dict], str | None] | None = None


VARIANTS: Registry[MixtureVariant] = Registry("mixture variant", "model_glue.mixture.variants")


def catalog_refusal(check: str) -> Callable[[dict], str | None]:
    """The architecture catalog's ``check`` (``moe_refusal``, ``block_refusal``), imported
    when first called: the catalog's package imports torch, declarations must not."""

    def refusal(config: dict) -> str | None:
        from model_glue.architectures import catalog

        return getattr(catalog, check)(config)

    return refusal


def load_transformers(path: Path, record: dict, device: str, dtype: str | None) -> nn.Module:
    """A mixture directory that transformers itself loads (FFN-level and hybrid)."""
    from model_glue.mixture.loading import load_model

    return load_model(path, f"{record['kind']} mixture", device=device, dtype=dtype)
