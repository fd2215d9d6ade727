"""The nightly zoo refresh: the recipe flow on a cron schedule.

Two ways to run it (both need a Prefect server: `prefect server start`, then
`PREFECT_API_URL=http://127.0.0.1:4200/api`; the temporary server that `glue run` starts
does not run schedules):

- ``glue schedule CONFIG --cron "0 2 * * *"``: serve the deployment from this process.
- ``prefect deploy --prefect-file deployments/prefect.yaml --all`` then
  ``prefect worker start --pool model-glue``: a work pool, for Dask/remote workers later.

Every night only what changed reruns: untouched models hit the fingerprint stat cache, and
all later stages are keyed on content.
"""

from __future__ import annotations

from pathlib import Path

from flows.glue_recipe import glue_recipe

DEFAULT_CRON = "0 2 * * *"
DEPLOYMENT_NAME = "nightly-zoo-refresh"


def nightly_deployment(
    config_path: str | Path, *, cron: str = DEFAULT_CRON, name: str = DEPLOYMENT_NAME
):
    """A Prefect ``RunnerDeployment`` of the recipe for ``config_path`` on ``cron``, on
    the task runner its ``runner:`` asks for (a config that cannot be read: threads)."""
    from flows.glue_recipe import with_runner
    from model_glue.config import ConfigError, load_config

    try:
        flow = with_runner(glue_recipe, load_config(config_path))
    except ConfigError:
        flow = glue_recipe  # the run itself reports the config's error, in one line
    return flow.to_deployment(
        name=name,
        cron=cron,
        parameters={"config_path": str(Path(config_path).resolve())},
        description="Model-GLUE nightly zoo refresh: reruns only the stages whose inputs changed.",
        tags=["model-glue", "nightly"],
    )


def serve(
    config_path: str | Path, *, cron: str = DEFAULT_CRON
) -> None:  # pragma: no cover - blocks
    from prefect import serve as prefect_serve

    prefect_serve(nightly_deployment(config_path, cron=cron))
