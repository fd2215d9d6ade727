import yaml

from tests.conftest import ROOT


def test_nightly_deployment_has_the_schedule_and_parameters(tmp_path):
    from deployments.nightly import DEPLOYMENT_NAME, nightly_deployment

    cfg = tmp_path / "glue.yaml"
    cfg.write_text("zoo: []\n")
    dep = nightly_deployment(cfg, cron="30 1 * * *")
    assert dep.name == DEPLOYMENT_NAME
    assert dep.parameters == {"config_path": str(cfg.resolve())}
    assert [s.schedule.cron for s in dep.schedules] == ["30 1 * * *"]
    assert dep.entrypoint.endswith("flows/glue_recipe.py:glue_recipe")


def test_prefect_yaml_declares_the_nightly_deployment_of_the_recipe_flow(monkeypatch):
    """The work-pool deployment (prefect.yaml) and the served one (nightly.py) are the same
    flow, on the same schedule, with the same parameters: the entrypoint is loaded the way
    a Prefect worker loads it (from the repository root) and compared to the flow."""
    from prefect.flows import load_flow_from_entrypoint

    from deployments.nightly import DEFAULT_CRON, DEPLOYMENT_NAME, nightly_deployment
    from flows.glue_recipe import glue_recipe

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(dep["entrypoint"], use_placeholder_flow=False)
    assert flow.name == glue_recipe.name
    assert flow.parameters.model_dump() == glue_recipe.parameters.model_dump()
    assert set(dep["parameters"]) == set(flow.parameters.required) == {"config_path"}
    served = nightly_deployment(ROOT / "glue.yaml")
    assert dep["name"] == served.name == DEPLOYMENT_NAME
    assert dep["entrypoint"] == served.entrypoint.removeprefix(f"{ROOT}/")
    assert [s["cron"] for s in dep["schedules"]] == [DEFAULT_CRON]
    assert [s.schedule.cron for s in served.schedules] == [DEFAULT_CRON]
    assert set(dep["tags"]) == set(served.tags)
