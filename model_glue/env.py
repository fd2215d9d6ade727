"""Process environment for offline, self-contained runs.

Every entry point (CLI, flows, tests, benchmarks) calls :func:`configure_environment` before
importing transformers, datasets or lm-eval, so that every cache lives inside the
project's working folder (``GLUE_HOME``, default ``<cwd>/.glue``) and no dataset is
fetched. The model hub is contacted only for the zoo's ``repo:`` entries and ``zoo_from``
(:mod:`model_glue.hub`); ``HF_HUB_OFFLINE=1`` (as ``make run`` and ``make test`` set it)
answers those from the cache alone.
"""

from __future__ import annotations

import os
from pathlib import Path


def glue_home() -> Path:
    return Path(os.environ.get("GLUE_HOME", Path.cwd() / ".glue")).absolute()


def configure_environment() -> Path:
    """Set the datasets offline flag and project-local cache folders (without overriding
    the user's)."""
    home = glue_home()
    defaults = {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "HF_DATASETS_CACHE": str(home / "hf" / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_HOME": str(home / "prefect"),
        # cached task results live beside the artifact store, not in whichever PREFECT_HOME
        # the user's server setup uses, so a real server reuses the temporary server's cache
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect" / "storage"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    home.mkdir(parents=True, exist_ok=True)
    return home
