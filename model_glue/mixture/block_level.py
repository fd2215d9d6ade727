"""Block-level mixture: each expert is a whole decoder layer of its source model.

Embeddings, final norm and LM head come from a base (merged) model; at every layer a gate reads
the hidden state entering the layer, pooled over the sample's real tokens (``mean`` or
``first``, padding excluded), and sends the sample to one expert's layer (top-1). Routing is
per sample and decided on the prompt, so once decided a sample follows a fixed *path* (one
expert per layer) through ordinary Llama layers: generation and scoring run a plain
``LlamaForCausalLM`` assembled from shared modules for that path, with its KV cache.

All experts and the base must share one architecture and tokenizer (otherwise: MixtureError).

Directory format: ``config.json`` (the shared Llama config), tokenizer files,
``model.safetensors`` (``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``
and ``experts.{layer}.{expert}.<decoder-layer tensor>``), ``router.safetensors`` (``weight``
[layers, E, H]) and ``mixture.json`` (kind ``block_level``, expert names, pooling, router).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from model_glue.devices import resolve_device, resolve_dtype
from model_glue.mixture.gate import SampleGate
from model_glue.mixture.generation import greedy_generate
from model_glue.mixture.hidden import POOLINGS, Pooling, encode, pool
from model_glue.mixture.layout import (
    require_block_family,
    require_same_layout,
    require_same_tokenizer,
)
from model_glue.mixture.loading import (
    MixtureError,
    ModelSource,
    atomic_directory,
    describe_source,
    first_tokenizer,
    load_model,
    load_tokenizer,
    model_name,
    try_tokenizer,
)
from model_glue.mixture.prompts import PromptsInput
from model_glue.mixture.record import MIXTURE_FILE
from model_glue.mixture.routers import RouterInit, init_gates

ROUTER_FILE = "router.safetensors"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_DTYPE = torch.float32  # what the builder writes
SHARED_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
Route = tuple[int, ...]


class _RoutedLayer(nn.Module):
    """Routing pass only: runs every expert's layer, keeps each sample's chosen output."""

    def __init__(self, owner: BlockLevelMixture, layer: int) -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (cycle)
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        owner = self._owner[0]
        choice = owner.gates[self.layer](pool(hidden_states, owner._mask, owner.pooling))
        outs = torch.stack(
            [block(hidden_states, *args, **kwargs) for block in owner.experts[self.layer]]
        )
        owner._choices.append(choice)
        return outs[choice, torch.arange(hidden_states.shape[0], device=choice.device)]


class BlockLevelMixture(nn.Module):
    """Per-layer expert decoder layers behind per-layer sample-level gates."""

    def __init__(
        self,
        shell: LlamaForCausalLM,
        config: LlamaConfig,
        layers: Sequence[Sequence[nn.Module]],
        gates: torch.Tensor,
        names: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        pooling: Pooling = "mean",
    ) -> None:
        """``layers[l][e]`` is expert e's decoder layer l; ``gates`` is [layers, E, H]."""
        super().__init__()
        if pooling not in ("mean", "first"):
            raise MixtureError(f"block-level pooling {pooling!r} must be 'mean' or 'first'")
        if gates.shape != (config.num_hidden_layers, len(names), config.hidden_size):
            raise MixtureError(
                f"gates {tuple(gates.shape)} do not match {config.num_hidden_layers} layers x "
                f"{len(names)} experts x hidden {config.hidden_size}"
            )
        self.config = config
        self.shell = shell
        self.experts = nn.ModuleList(nn.ModuleList(row) for row in layers)
        self.gates = nn.ModuleList(SampleGate(g) for g in gates)
        self.names = list(names)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self._paths: dict[Route, LlamaForCausalLM] = {}
        self._router = self._assemble(
            [_RoutedLayer(self, i) for i in range(config.num_hidden_layers)]
        )
        self._mask: torch.Tensor | None = None
        self._choices: list[torch.Tensor] = []

    def _assemble(self, layers: Sequence[nn.Module]) -> LlamaForCausalLM:
        """A LlamaForCausalLM that shares the shell's embeddings, norm, head and RoPE."""
        with torch.device("meta"):
            model = LlamaForCausalLM(self.config)
        model.model.embed_tokens = self.shell.model.embed_tokens
        model.model.norm = self.shell.model.norm
        model.model.rotary_emb = self.shell.model.rotary_emb
        model.lm_head = self.shell.lm_head
        model.model.layers = nn.ModuleList(layers)
        return model.eval()

    @torch.no_grad()
    def route_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, layers] expert chosen for each sample at each layer (padding excluded from pooling)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        self._mask, self._choices = mask, []
        try:
            self._router(input_ids=input_ids, attention_mask=mask, use_cache=False)
            return torch.stack(self._choices, dim=1)
        finally:
            self._mask, self._choices = None, []

    @property
    def device(self) -> torch.device:
        return self.shell.lm_head.weight.device

    def path_model(self, path: Route) -> LlamaForCausalLM:
        """The dense model a sample routed along ``path`` runs (built once, weights shared)."""
        path = tuple(int(e) for e in path)
        if path not in self._paths:
            self._paths[path] = self._assemble([self.experts[i][e] for i, e in enumerate(path)])
        return self._paths[path]

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V]; each sample is routed on its real tokens, then runs its path."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        routes = self.route_ids(input_ids, mask)
        logits = None
        for path in {tuple(r) for r in routes.tolist()}:
            rows = [i for i, r in enumerate(routes.tolist()) if tuple(r) == path]
            out = self.path_model(path)(input_ids=input_ids[rows], attention_mask=mask[rows]).logits
            if logits is None:
                logits = out.new_zeros(input_ids.shape[0], *out.shape[1:])
            logits[rows] = out
        return logits

    # The routed-LM protocol used by MixtureLM.
    def route_texts(self, texts: Sequence[str]) -> list[Hashable]:
        if not texts:
            return []
        ids, mask = encode(self.tokenizer, texts, self.config.max_position_embeddings)
        return [tuple(r) for r in self.route_ids(ids, mask).tolist()]

    def expert_for(self, key: Hashable) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return self.path_model(key), self.tokenizer

    def describe_route(self, key: Hashable) -> str:
        return "/".join(self.names[e] for e in key)

    def generate(
        self, texts: Sequence[str], max_new_tokens: int = 16, until: Sequence[str] = ()
    ) -> list[str]:
        routes = self.route_texts(texts)
        out = [""] * len(texts)
        for path in set(routes):
            idx = [i for i, r in enumerate(routes) if r == path]
            gens = greedy_generate(
                self.path_model(path),
                self.tokenizer,
                [texts[i] for i in idx],
                max_new_tokens,
                until,
            )
            for i, g in zip(idx, gens, strict=True):
                out[i] = g
        return out


def _shell_from(config: LlamaConfig, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """Embeddings, norm, head and RoPE only: a zero-layer Llama (cheap to initialise)."""
    shell_cfg = copy.deepcopy(config)
    shell_cfg.num_hidden_layers = 0
    shell = LlamaForCausalLM(shell_cfg).eval()
    for key in SHARED_KEYS:
        if key not in state:
            raise MixtureError(f"block-level mixture: missing shared tensor {key!r}")
    shell.load_state_dict({k: state[k] for k in SHARED_KEYS}, strict=False)
    return shell


def build_block_level_mixture(
    base_uri_or_model: ModelSource,
    expert_uris: Sequence[ModelSource],
    out_dir: str | Path,
    *,
    router: RouterInit | None = None,
    prompts: PromptsInput | None = None,
    pooling: Pooling = "mean",
    expert_names: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write a block-level mixture directory (module docstring) and return its path.

    ``base_uri_or_model`` gives embeddings, final norm, head, tokenizer and the hidden states
    the training-free gates are read from (pooled like the routing itself).
    """
    router = router or RouterInit()
    if pooling not in ("mean", "first"):
        raise MixtureError(
            f"router.pooling: {pooling!r} not allowed for block-level (allowed: mean, first)"
        )
    names = (
        list(expert_names)
        if expert_names
        else [model_name(s, i) for i, s in enumerate(expert_uris)]
    )
    if len(names) != len(expert_uris) or len(set(names)) != len(names) or len(names) < 2:
        raise MixtureError(f"expert names {names} must be unique, one per expert, at least two")
    base = load_model(base_uri_or_model, "base")
    experts = [load_model(s, f"expert {n}") for s, n in zip(expert_uris, names, strict=True)]
    all_names = ["base", *names]
    for m, n in zip([base, *experts], all_names, strict=True):
        require_block_family(m, n)
    require_same_layout([base, *experts], all_names)
    tok = tokenizer or first_tokenizer([base_uri_or_model, *expert_uris])
    if tok is None:
        raise MixtureError("block-level mixture: no tokenizer found beside the base or any expert")
    require_same_tokenizer([tok, *[try_tokenizer(s) for s in expert_uris]], all_names)
    num_layers = base.config.num_hidden_layers
    gates = init_gates(router, base, tok, prompts, names, range(num_layers), pooling=pooling)
    base_state = base.state_dict()
    tensors = {
        k: base_state[k].detach().to(WEIGHTS_DTYPE).contiguous().clone() for k in SHARED_KEYS
    }
    for layer in range(num_layers):
        for e, model in enumerate(experts):
            for key, t in model.model.layers[layer].state_dict().items():
                tensors[f"experts.{layer}.{e}.{key}"] = (
                    t.detach().to(WEIGHTS_DTYPE).contiguous().clone()
                )
    with atomic_directory(out_dir) as tmp:
        cfg = copy.deepcopy(base.config)
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        save_file({"weight": gates.contiguous()}, str(tmp / ROUTER_FILE))
        record = {
            "format": "model-glue-mixture",
            "version": 1,
            "kind": "block_level",
            "experts": [
                {"name": n, "source": describe_source(s)}
                for n, s in zip(names, expert_uris, strict=True)
            ],
            "base": describe_source(base_uri_or_model),
            "router": {"pooling": pooling, "init": router.to_dict()},
        }
        (tmp / MIXTURE_FILE).write_text(json.dumps(record, indent=2))
    return Path(out_dir).absolute()


def load_block_level_mixture(
    path: str | Path, record: dict, device: str = "cpu", dtype: str | None = "float32"
) -> BlockLevelMixture:
    """The mixture on ``device`` in ``dtype`` (``auto``: see :mod:`model_glue.devices`);
    its gates stay float32."""
    root = Path(path)
    try:
        names = [e["name"] for e in record["experts"]]
        pooling = record["router"]["pooling"]
    except (KeyError, TypeError) as e:
        raise MixtureError(f"{root / MIXTURE_FILE}: malformed block-level record ({e!r})") from e
    if pooling not in POOLINGS:
        raise MixtureError(f"{root / MIXTURE_FILE}: router.pooling {pooling!r} unknown")
    config = LlamaConfig.from_pretrained(root)
    state = load_file(str(root / WEIGHTS_FILE))
    layers = []
    for i in range(config.num_hidden_layers):
        row = []
        for e, name in enumerate(names):
            prefix = f"experts.{i}.{e}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise MixtureError(
                    f"{root / WEIGHTS_FILE}: no tensors for layer {i} of expert {name}"
                )
            with torch.device("meta"):
                block = LlamaDecoderLayer(config, i)
            block.load_state_dict(sub, strict=True, assign=True)
            row.append(block.eval())
        layers.append(row)
    gates = load_file(str(root / ROUTER_FILE))["weight"]
    tok = load_tokenizer(root, "block-level mixture")
    mixture = BlockLevelMixture(
        _shell_from(config, state), config, layers, gates, names, tok, pooling
    )
    device = resolve_device(device)
    mixture.to(device)
    # the layers take the dtype; the gates keep their float32 values
    for part in (mixture.shell, mixture.experts):
        part.to(dtype=resolve_dtype(dtype, device, WEIGHTS_DTYPE))
    return mixture


def mixture_from_models(
    base: PreTrainedModel,
    experts: Sequence[PreTrainedModel],
    gates: torch.Tensor,
    names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    pooling: Pooling = "mean",
) -> BlockLevelMixture:
    """In-memory block-level mixture (no directory), sharing the experts' layer modules."""
    layers = [[m.model.layers[i] for m in experts] for i in range(base.config.num_hidden_layers)]
    state = {k: v for k, v in base.state_dict().items() if k in SHARED_KEYS}
    return BlockLevelMixture(
        _shell_from(base.config, state), base.config, layers, gates, names, tokenizer, pooling
    )
