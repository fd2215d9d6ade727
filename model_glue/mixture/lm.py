"""lm-eval model class for model-level and block-level mixtures (``--model glue-mixture``).

Each request is routed on its text (the context for ``loglikelihood`` / ``generate_until``,
the whole string for ``loglikelihood_rolling``), then handed to lm-eval's own ``HFLM`` wrapping
the model behind that route (an expert model, or a block-level path), so batching, stop
strings and rolling windows behave exactly as for any Hugging Face model. FFN-level and hybrid
mixtures are plain Mixtral directories: evaluate them with the standard ``hf`` model.

Every decision is kept in :attr:`MixtureLM.routes` (text -> route), from which router accuracy
is computed.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from model_glue.mixture.block_level import BlockLevelMixture
from model_glue.mixture.loading import MixtureError
from model_glue.mixture.model_level import ModelLevelMixture

RoutedMixture = ModelLevelMixture | BlockLevelMixture


@register_model("glue-mixture")
class MixtureLM(LM):
    """Route, then delegate to one ``HFLM`` per route."""

    def __init__(
        self,
        mixture: RoutedMixture | str | Path | None = None,
        *,
        pretrained: str | None = None,
        batch_size: int | str = 32,
        max_gen_toks: int | None = None,
        route_batch_size: int = 64,
        device: str = "cpu",
        dtype: str | None = "float32",
        **hf_kwargs: Any,
    ) -> None:
        """``device`` and ``dtype`` place a mixture loaded from ``pretrained`` (``auto``:
        see :mod:`model_glue.devices`); a mixture object is used where it is.
        ``batch_size`` may be ``"auto"`` (lm-eval's search, per route)."""
        super().__init__()
        source = mixture if mixture is not None else pretrained
        if source is None:
            raise MixtureError(
                "glue-mixture: pass a mixture object or pretrained=<mixture directory>"
            )
        if isinstance(source, str | Path):
            from model_glue.mixture.variants import load_mixture

            source = load_mixture(source, device=device, dtype=dtype)
        if not isinstance(source, ModelLevelMixture | BlockLevelMixture):
            raise MixtureError(
                f"glue-mixture serves model-level and block-level mixtures, not {type(source).__name__} "
                "(evaluate a Mixtral directory with the 'hf' model)"
            )
        self.mixture = source
        self.batch_size = batch_size if batch_size == "auto" else int(batch_size)
        self.route_batch_size = route_batch_size
        self.hf_kwargs = dict(hf_kwargs)
        if max_gen_toks is not None:
            self.hf_kwargs["max_gen_toks"] = int(max_gen_toks)
        self.routes: dict[str, Hashable] = {}
        self._lms: dict[Hashable, HFLM] = {}

    def lm_for(self, key: Hashable) -> HFLM:
        if key not in self._lms:
            model, tokenizer = self.mixture.expert_for(key)
            self._lms[key] = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=self.batch_size,
                max_length=int(model.config.max_position_embeddings),
                **self.hf_kwargs,
            )
        return self._lms[key]

    def route(self, texts: list[str]) -> list[Hashable]:
        todo = sorted({t for t in texts if t not in self.routes})
        for start in range(0, len(todo), self.route_batch_size):
            chunk = todo[start : start + self.route_batch_size]
            self.routes.update(zip(chunk, self.mixture.route_texts(chunk), strict=True))
        return [self.routes[t] for t in texts]

    def _dispatch(self, requests: list, texts: list[str], method: str) -> list:
        keys = self.route(texts)
        out: list = [None] * len(requests)
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            results = getattr(self.lm_for(key), method)([requests[i] for i in idx])
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._dispatch(requests, [r.args[0] for r in requests], "loglikelihood")

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        return self._dispatch(requests, [r.args[0] for r in requests], "loglikelihood_rolling")

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        return self._dispatch(requests, [r.args[0] for r in requests], "generate_until")

    def route_counts(self) -> dict[str, int]:
        """How many distinct texts went to each route (named by expert)."""
        counts: dict[str, int] = {}
        for key in self.routes.values():
            name = self.mixture.describe_route(key)
            counts[name] = counts.get(name, 0) + 1
        return counts
