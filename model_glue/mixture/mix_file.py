"""``glue mix MIX.yaml OUT``: one mixture from a YAML file, as ``glue merge`` does for merges.

    variant: ffn_moe                 # model_level | block_level | ffn_moe | hybrid
    experts: [models/a, models/b]    # relative to this file
    names: [a, b]                    # optional (default: the folder names)
    backbone: models/a               # router backbone / base (default: the first expert)
    router: hidden                   # hidden | cheap_embed | random
    seed: 0                          # random router
    top_k: 1                         # ffn_moe / hybrid: experts per token
    prompts:                         # per expert name: example inputs it should get
      a: ["3+4=", "1+1="]
      b: {positive: ["last cat="], negative: ["3+4="]}

Every other key is the variant's own, as in a run configuration's ``mixture`` section and
validated by the same settings model (``glue mix`` and the pipeline build through one
:func:`~model_glue.mixture.variants.build_mixture`): ``layer`` and ``pooling`` for
``model_level``, ``pooling`` for ``block_level``, ``hybrid_k`` and ``top_k`` for
``hybrid``. A fitted router and the pipeline's expert selection need proxy labels, which a
file does not have. Errors name the file and the key, as the run configuration's do.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model_glue.mixture.errors import MixtureError
from model_glue.mixture.routers.base import ROUTERS
from model_glue.mixture.variants import VARIANTS, BuildInputs, VariantSettings, build_mixture


class MixFile(BaseModel):
    """The file's own keys; the rest is the variant's settings (``mixture``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experts: list[str] = Field(min_length=2)
    names: list[str] | None = None
    backbone: str | None = None
    seed: int = 0  # the random router's
    mixture: VariantSettings

    @model_validator(mode="after")
    def _consistent(self) -> MixFile:
        if self.names is not None and len(self.names) != len(self.experts):
            raise ValueError(f"names: {len(self.names)} names for {len(self.experts)} experts")
        router = ROUTERS[self.mixture.router_used(fitted=False)]
        if router.fitted:
            raise ValueError(f"router: {router.name} is fitted on proxy labels; glue mix has none")
        if router.needs_prompts and not self.mixture.prompts:
            raise ValueError(
                f"prompts: the {router.name!r} router needs example prompts per expert"
            )
        return self


def load_mix_file(path: str | Path) -> tuple[MixFile, Path]:
    """The validated file and its folder (what relative paths are relative to)."""
    path = Path(path)
    if not path.is_file():
        raise MixtureError(f"{path}: mixture file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MixtureError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(data, dict):
        raise MixtureError(f"{path}: expected a mapping, got {type(data).__name__}")
    own = {k: v for k, v in data.items() if k in MixFile.model_fields and k != "mixture"}
    rest = {k: v for k, v in data.items() if k not in own}
    variant = rest.get("variant")
    if variant not in VARIANTS:
        raise MixtureError(
            f"{path}: variant: {'missing' if variant is None else f'unknown {variant!r}'} "
            f"(allowed: {', '.join(VARIANTS.names())})"
        )
    settings = VARIANTS[variant].settings
    if pipeline := sorted(set(rest) & set(settings.pipeline_only)):
        raise MixtureError(f"{path}: {pipeline[0]}: a run configuration's key; glue mix takes none")
    try:
        return MixFile.model_validate(
            own | {"mixture": settings.model_validate(rest)}
        ), path.parent.resolve()
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if p != "mixture")
        msg = first["msg"].removeprefix("Value error, ")
        raise MixtureError(f"{path}: {loc + ': ' if loc else ''}{msg}") from None


def build_from_file(path: str | Path, out: str | Path) -> Path:
    """Build the mixture ``path`` describes into the new directory ``out``."""
    from model_glue.mixture.routers import RouterInit

    spec, root = load_mix_file(path)
    out = Path(out)
    if out.exists():
        raise MixtureError(f"{out}: output directory already exists")
    experts = [str((root / e).resolve()) if "://" not in e else e for e in spec.experts]
    backbone = experts[0] if spec.backbone is None else str((root / spec.backbone).resolve())
    settings = spec.mixture
    return build_mixture(
        settings,
        BuildInputs(
            experts=experts,
            names=spec.names or [Path(e).name for e in experts],
            backbone=backbone,
            out=out,
            router=RouterInit(method=settings.router_used(fitted=False), seed=spec.seed),
            prompts=settings.prompts or None,
        ),
    )
