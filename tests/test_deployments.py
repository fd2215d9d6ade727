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


def test_prefect_yaml_points_at_the_recipe_flow():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    module, func = dep["entrypoint"].split(":")
    assert (ROOT / module).is_file()
    assert f"def {func}(" in (ROOT / module).read_text()
    assert dep["schedules"][0]["cron"] == "0 2 * * *"
