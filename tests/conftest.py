"""Shared fixtures: offline environment, tiny Llama checkpoints, the demo zoo, Prefect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests share the project's GLUE_HOME so the demo zoo (minutes to train) is built once and
# reused by `make run`; everything a test writes goes to its own tmp folder.
os.environ.setdefault("GLUE_HOME", str(ROOT / ".glue"))

from model_glue.env import configure_environment  # noqa: E402

configure_environment()


def save_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    base: Path | None = None,
    noise: float = 0.02,
    hidden: int = 16,
    layers: int = 2,
    vocab: int = 32,
    dtype: str = "float32",
) -> Path:
    """A tiny LlamaForCausalLM saved as a HF directory; with ``base``, a 'fine-tune' of it
    (the base weights plus seeded Gaussian noise of relative size ``noise``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    if base is not None:
        ref = LlamaForCausalLM.from_pretrained(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for (_, p), (_, q) in zip(
                model.named_parameters(), ref.named_parameters(), strict=True
            ):
                p.copy_(q + noise * q.abs().mean() * torch.randn(q.shape, generator=g))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def tiny_llama(tmp_path):
    def make(name: str = "m", **kw) -> Path:
        return save_tiny_llama(tmp_path / name, **kw)

    return make


@pytest.fixture(scope="session")
def demo_zoo() -> Path:
    """The embedded demo zoo, built once (a few minutes) and cached under GLUE_HOME/zoo."""
    from model_glue.zoo import build_demo_zoo

    return Path(build_demo_zoo(Path(os.environ["GLUE_HOME"]) / "zoo"))


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the session (about 15 s once)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
