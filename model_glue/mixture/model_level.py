"""Model-level mixture, the variant of the paper's final recipe.

A router reads the pooled hidden state entering layer k of a router backbone, once per sample,
and sends the whole sample to one expert model (top-1), which produces the answer. Routing
happens on *text*: the backbone tokenises the sample with its own tokenizer and each expert
generates with its own, so experts may come from different clusters, initial weights,
architectures or tokenizers. The only requirement is that every expert is a causal LM directory
with a tokenizer.

Directory format (``mixture.json`` + ``router.safetensors``)::

    {"format": "model-glue-mixture", "version": 1, "kind": "model_level",
     "experts": [{"name": "add-a", "path": "/abs/or/relative/dir"}, ...],
     "router": {"backbone": "/dir", "layer": 2, "pooling": "last", "init": {"method": "hidden", ...}}}

Relative paths are relative to the mixture directory: ``copy_experts=True`` stores copies under
``experts/<name>``, and ``relative_to`` (an artifact store's root) makes references to experts
inside that directory relative, so the store can be moved or mounted elsewhere as a whole.
``router.safetensors`` holds ``weight`` [E, H] and ``bias`` [E].
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model_glue.mixture.gate import SampleGate
from model_glue.mixture.generation import greedy_generate
from model_glue.mixture.hidden import POOLINGS, Pooling, layer_inputs
from model_glue.mixture.loading import (
    MixtureError,
    atomic_directory,
    load_model,
    load_tokenizer,
    local_dir,
)
from model_glue.mixture.prompts import PromptsInput
from model_glue.mixture.record import MIXTURE_FILE
from model_glue.mixture.routers import LinearGate, RouterInit, init_gates

ROUTER_FILE = "router.safetensors"


class ModelLevelMixture(nn.Module):
    """Experts (full models with their own tokenizers) behind a sample-level router."""

    def __init__(
        self,
        experts: Sequence[PreTrainedModel],
        tokenizers: Sequence[PreTrainedTokenizerBase],
        names: Sequence[str],
        backbone: PreTrainedModel,
        backbone_tokenizer: PreTrainedTokenizerBase,
        layer: int,
        gate: SampleGate,
        pooling: Pooling = "last",
    ) -> None:
        super().__init__()
        if not len(experts) == len(tokenizers) == len(names) == gate.weight.shape[0]:
            raise MixtureError("experts, tokenizers, names and gate rows must have the same length")
        if gate.weight.shape[1] != backbone.config.hidden_size:
            raise MixtureError(
                f"router gate reads {gate.weight.shape[1]} features but the backbone's hidden size is "
                f"{backbone.config.hidden_size}"
            )
        self.experts = nn.ModuleList(experts)
        self.tokenizers = list(tokenizers)
        self.names = list(names)
        self.backbone = backbone
        self.backbone_tokenizer = backbone_tokenizer
        self.layer = layer
        self.gate = gate
        self.pooling = pooling

    @torch.no_grad()
    def router_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, E] gate scores of each text."""
        pooled = layer_inputs(
            self.backbone, self.backbone_tokenizer, texts, [self.layer], pooling=self.pooling
        )[0]
        return self.gate.scores(pooled)

    def route(self, texts: Sequence[str]) -> list[int]:
        """Index of the expert that answers each text."""
        return self.router_scores(texts).argmax(-1).tolist() if texts else []

    # The routed-LM protocol used by MixtureLM: a route key per text, and a model per key.
    def route_texts(self, texts: Sequence[str]) -> list[Hashable]:
        return self.route(texts)

    def expert_for(self, key: Hashable) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return self.experts[key], self.tokenizers[key]

    def describe_route(self, key: Hashable) -> str:
        return self.names[key]

    def generate(
        self, texts: Sequence[str], max_new_tokens: int = 16, until: Sequence[str] = ()
    ) -> list[str]:
        """Greedy continuation of each text by its routed expert."""
        routes = self.route(texts)
        out: list[str] = [""] * len(texts)
        for e in sorted(set(routes)):
            idx = [i for i, r in enumerate(routes) if r == e]
            gens = greedy_generate(
                self.experts[e], self.tokenizers[e], [texts[i] for i in idx], max_new_tokens, until
            )
            for i, g in zip(idx, gens, strict=True):
                out[i] = g
        return out

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Routing decisions as a tensor (the experts themselves run in :meth:`generate`)."""
        return torch.tensor(self.route(texts), dtype=torch.long)


def build_model_level_mixture(
    expert_uris: Sequence[str | Path],
    out_dir: str | Path,
    *,
    router_backbone: str | Path,
    layer: int,
    router: RouterInit | LinearGate | None = None,
    prompts: PromptsInput | None = None,
    pooling: Pooling = "last",
    expert_names: Sequence[str] | None = None,
    copy_experts: bool = False,
    relative_to: str | Path | None = None,
    location: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = "float32",
) -> Path:
    """Write a model-level mixture directory (see module docstring) and return its path.

    ``router`` is a training-free :class:`RouterInit` (gates read at ``layer`` of
    ``router_backbone`` on the per-expert ``prompts``) or a fitted :class:`LinearGate`.
    Experts and the backbone inside ``relative_to`` are referenced relative to
    ``location``, where the directory will finally live (default ``out_dir``; a store
    builds it elsewhere and renames it); others by absolute path.
    """
    router = router if router is not None else RouterInit()
    dirs = [local_dir(u, "expert") for u in expert_uris]
    names = list(expert_names) if expert_names else [d.name for d in dirs]
    if len(names) != len(dirs) or len(set(names)) != len(names):
        raise MixtureError(f"expert names {names} must be unique, one per expert")
    if len(dirs) < 2:
        raise MixtureError("a model-level mixture needs at least two experts")
    if pooling not in POOLINGS:
        raise MixtureError(f"router.pooling: unknown {pooling!r} (allowed: {', '.join(POOLINGS)})")
    for d, n in zip(dirs, names, strict=True):
        load_tokenizer(d, f"expert {n}")  # refuse now, not at evaluation time
    backbone_dir = local_dir(router_backbone, "router backbone")
    backbone = load_model(backbone_dir, "router backbone", device=device, dtype=dtype)
    num_layers = backbone.config.num_hidden_layers
    if not 0 <= layer < num_layers:
        raise MixtureError(
            f"router.layer = {layer} must be in 0..{num_layers - 1} for {backbone_dir}"
        )
    if isinstance(router, LinearGate):
        weight, bias, init = (
            router.weight,
            router.bias,
            {"method": "linear", "n_train": router.n_train},
        )
        if weight.shape != (len(dirs), backbone.config.hidden_size):
            raise MixtureError(
                f"fitted router weight {tuple(weight.shape)} does not match "
                f"{len(dirs)} experts x hidden {backbone.config.hidden_size}"
            )
    else:
        tok = load_tokenizer(backbone_dir, "router backbone")
        weight = init_gates(router, backbone, tok, prompts, names, [layer], pooling=pooling)[0]
        bias, init = torch.zeros(len(dirs)), router.to_dict()
    home = Path(location if location is not None else out_dir).absolute()
    root = Path(relative_to).absolute() if relative_to is not None else None

    def reference(d: Path) -> str:
        d = d.absolute()
        return os.path.relpath(d, home) if root is not None and d.is_relative_to(root) else str(d)

    with atomic_directory(out_dir) as tmp:
        experts = []
        for d, n in zip(dirs, names, strict=True):
            if copy_experts:
                shutil.copytree(d, tmp / "experts" / n)
                experts.append({"name": n, "path": f"experts/{n}"})
            else:
                experts.append({"name": n, "path": reference(d)})
        save_file(
            {"weight": weight.contiguous(), "bias": bias.contiguous()}, str(tmp / ROUTER_FILE)
        )
        record = {
            "format": "model-glue-mixture",
            "version": 1,
            "kind": "model_level",
            "experts": experts,
            "router": {
                "backbone": reference(backbone_dir),
                "layer": layer,
                "pooling": pooling,
                "init": init,
            },
        }
        (tmp / MIXTURE_FILE).write_text(json.dumps(record, indent=2))
    return Path(out_dir).absolute()


def load_model_level_mixture(
    path: str | Path, record: dict, device: str = "cpu", dtype: str | None = "float32"
) -> ModelLevelMixture:
    """The mixture with its experts and backbone on ``device`` in ``dtype`` (a model that
    is both an expert and the backbone is loaded once); the gate stays float32."""
    root = Path(path)

    def resolve(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else root / q

    try:
        experts = record["experts"]
        r = record["router"]
        backbone_dir, layer, pooling = (
            resolve(r["backbone"]),
            int(r["layer"]),
            r.get("pooling", "last"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise MixtureError(f"{root / MIXTURE_FILE}: malformed model-level record ({e!r})") from e
    loaded: dict[Path, PreTrainedModel] = {}

    def model(d: Path, what: str) -> PreTrainedModel:
        key = d.resolve()
        if key not in loaded:
            loaded[key] = load_model(d, what, device=device, dtype=dtype)
        return loaded[key]

    names = [e["name"] for e in experts]
    models = [model(resolve(e["path"]), f"expert {e['name']}") for e in experts]
    toks = [load_tokenizer(resolve(e["path"]), f"expert {e['name']}") for e in experts]
    backbone = model(backbone_dir, "router backbone")
    state = load_file(str(root / ROUTER_FILE))
    gate = SampleGate(state["weight"], state["bias"])
    return ModelLevelMixture(
        models,
        toks,
        names,
        backbone,
        load_tokenizer(backbone_dir, "router backbone"),
        layer,
        gate,
        pooling,
    )
