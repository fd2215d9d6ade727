"""Shared fixtures: an offline environment in a throwaway GLUE_HOME, tiny Llama checkpoints,
the demo zoo (slow tests only), Prefect."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The demo zoo (minutes to train) is shared with `make run`: it is built once under the
# project's GLUE_HOME and reused. Everything else a test writes (Prefect's home and
# results, HF caches, a default store) goes to a GLUE_HOME of the session's own, removed
# at exit, so that no test leaves anything in the project's `.glue` but the zoo.
DEMO_ZOO = Path(os.environ.get("GLUE_HOME") or ROOT / ".glue").absolute() / "zoo"
_HOME = tempfile.mkdtemp(prefix="glue-tests-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["GLUE_HOME"] = _HOME
# Tiny models: one torch thread each is fastest, and on a loaded machine (CI runners, two
# cores) a second thread per process spins for seconds per step (the tiny zoo builds in 5 s
# instead of 20). Subprocesses (glue, Dask workers) inherit it; OMP_NUM_THREADS overrides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from model_glue.env import configure_environment  # noqa: E402

configure_environment()

from tests.factories import save_family, save_tiny_llama  # noqa: E402


@pytest.fixture
def tiny_llama(tmp_path):
    """``make(name, **kw)``: :func:`tests.factories.save_tiny_llama` at ``tmp_path/name``."""

    def make(name: str = "m", **kw) -> Path:
        return save_tiny_llama(tmp_path / name, **kw)

    return make


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama ``base`` and four fine-tunes of it (``a``..``d``), each with the demo
    zoo's character tokenizer: any model with a tokenizer, no training. Read only."""
    from model_glue.zoo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    root = tmp_path_factory.mktemp("family")
    return save_family(root, ["a", "b", "c", "d"], tokenizer=tok, vocab=len(tok))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The demo zoo takes minutes to train: only tests marked slow may ask for it, so that
    ``make test-fast`` never builds it (fails before the zoo is built)."""
    if "demo_zoo" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
        pytest.fail(
            f"{item.nodeid} uses the demo_zoo fixture but is not marked slow: mark it "
            "@pytest.mark.slow, or build tiny models (tests/factories.py, tiny_llama, "
            "tiny_family)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def demo_zoo() -> Path:
    """The embedded demo zoo, built once (a few minutes) and cached in the project's
    GLUE_HOME (``.glue/zoo``), where ``make run`` finds it too. Slow tests only."""
    from model_glue.zoo import build_demo_zoo

    return Path(build_demo_zoo(DEMO_ZOO))


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the session (about 15 s once)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
