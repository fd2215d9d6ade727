"""``glue mix MIX.yaml OUT``: one mixture from a YAML file, as ``glue merge`` does for merges.

    variant: ffn_moe                 # model_level | block_level | ffn_moe | hybrid
    experts: [models/a, models/b]    # relative to this file
    names: [a, b]                    # optional (default: the folder names)
    backbone: models/a               # router backbone / base (default: the first expert)
    router: hidden                   # hidden | cheap_embed | random
    seed: 0                          # random router
    layer: 2                         # model_level: the backbone layer the router reads
    pooling: last                    # last | mean
    top_k: 1                         # ffn_moe / hybrid: experts per token
    hybrid_k: 2                      # hybrid: dense layers (the experts' uniform average)
    prompts:                         # per expert name: example inputs it should get
      a: ["3+4=", "1+1="]
      b: {positive: ["last cat="], negative: ["3+4="]}

Errors name the file and the key, as the run config's do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model_glue.mixture.loading import MixtureError


class MixFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["model_level", "block_level", "ffn_moe", "hybrid"]
    experts: list[str] = Field(min_length=2)
    names: list[str] | None = None
    backbone: str | None = None
    router: Literal["hidden", "cheap_embed", "random"] = "hidden"
    seed: int = 0
    layer: int = Field(default=1, ge=0)
    pooling: Literal["last", "mean", "first"] | None = None  # default: last; block_level mean
    top_k: int | None = Field(default=None, ge=1)
    hybrid_k: int = Field(default=0, ge=0)
    prompts: dict[str, list[str] | dict[str, list[str]]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MixFile:
        if self.names is not None and len(self.names) != len(self.experts):
            raise ValueError(f"names: {len(self.names)} names for {len(self.experts)} experts")
        if self.variant == "hybrid" and self.hybrid_k < 1:
            raise ValueError("hybrid_k: the hybrid variant needs hybrid_k >= 1")
        if self.router != "random" and not self.prompts:
            raise ValueError(
                f"prompts: the {self.router!r} router needs example prompts per expert"
            )
        return self


def load_mix_file(path: str | Path) -> tuple[MixFile, Path]:
    """The validated file and its folder (what relative paths are relative to)."""
    path = Path(path)
    if not path.is_file():
        raise MixtureError(f"{path}: mixture file not found")
    try:
        data = yaml.safe_load(path.read_text())
        return MixFile.model_validate(data), path.parent.resolve()
    except yaml.YAMLError as e:
        raise MixtureError(f"{path}: malformed YAML: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise MixtureError(f"{path}: {loc + ': ' if loc else ''}{msg}") from None


def build_from_file(path: str | Path, out: str | Path) -> Path:
    """Build the mixture ``path`` describes into the new directory ``out``."""
    from model_glue.mixture import (
        RouterInit,
        build_block_level_mixture,
        build_ffn_moe,
        build_hybrid,
        build_model_level_mixture,
        uniform_average,
    )

    spec, root = load_mix_file(path)
    out = Path(out)
    if out.exists():
        raise MixtureError(f"{out}: output directory already exists")
    experts = [str((root / e).resolve()) if "://" not in e else e for e in spec.experts]
    backbone = experts[0] if spec.backbone is None else str((root / spec.backbone).resolve())
    names = spec.names or [Path(e).name for e in experts]
    common = {
        "router": RouterInit(method=spec.router, seed=spec.seed),
        "prompts": spec.prompts,
        "expert_names": names,
    }
    if spec.variant == "model_level":
        return build_model_level_mixture(
            experts,
            out,
            router_backbone=backbone,
            layer=spec.layer,
            pooling=spec.pooling or "last",
            **common,
        )
    if spec.variant == "block_level":
        return build_block_level_mixture(
            backbone, experts, out, pooling=spec.pooling or "mean", **common
        )
    if spec.variant == "ffn_moe":
        return build_ffn_moe(backbone, experts, out, top_k=spec.top_k, **common)
    return build_hybrid(
        uniform_average(experts), experts, out, k=spec.hybrid_k, top_k=spec.top_k, **common
    )
