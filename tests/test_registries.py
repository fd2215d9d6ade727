"""Mixture variants, routers and search strategies are declared in registries; the run
configuration's ``mixture`` and ``filter`` sections and ``merge.params`` are validated
against the declarations when the file loads, with one line naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model_glue.config import ConfigError, RunConfig, parse_config
from model_glue.mixture.routers.base import ROUTERS, Router
from model_glue.mixture.variants import VARIANTS
from model_glue.search.strategies import STRATEGIES

BASE = {"zoo": [{"name": "a", "path": "/x"}], "evaluation": {"tasks": ["t"]}}


def cfg(**sections) -> RunConfig:
    return parse_config(BASE | sections, "glue.yaml")


def error(**sections) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(**sections)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_the_registries_hold_every_variant_router_and_strategy():
    assert VARIANTS.names() == ["block_level", "ffn_moe", "hybrid", "model_level"]
    assert ROUTERS.names() == ["cheap_embed", "hidden", "linear", "random"]
    assert STRATEGIES.names() == ["average", "coefficient", "evolutionary", "none", "similarity"]
    assert [r.name for r in ROUTERS if r.fitted] == ["linear"]
    assert [r.name for r in ROUTERS if not r.needs_prompts] == ["linear", "random"]
    assert [v.name for v in VARIANTS if v.routes_samples] == ["model_level"]


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="router 'hidden' is registered twice"):
        ROUTERS.register(Router("hidden", doc="again", needs_prompts=True))


def test_declarations_load_without_transformers_or_the_search_stack():
    code = (
        "import sys; import model_glue.config as c; "
        "c.parse_config({'zoo': [{'name': 'a', 'path': '/x'}], 'evaluation': {'tasks': ['t']},"
        " 'mixture': {'variant': 'ffn_moe', 'router': 'random'},"
        " 'filter': {'strategy': 'evolutionary'}}); "
        "print(sorted(m for m in ('transformers', 'cma', 'lm_eval') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_defaults_come_from_the_chosen_entry():
    c = cfg()
    assert c.filter.strategy == "none" and c.mixture.variant == "none"
    assert cfg(filter={"proxy_limit": 5}).filter.strategy == "none"
    m = cfg(mixture={"router": "random"}).mixture
    assert (m.variant, m.pooling, m.router_used()) == ("model_level", "last", "random")
    assert cfg(mixture={"prompts": {"t": ["x"]}}).mixture.router_used() == "linear"
    b = cfg(mixture={"variant": "block_level", "prompts": {"t": ["x"]}}).mixture
    assert (b.pooling, b.router_used()) == ("mean", "hidden")
    evo = cfg(filter={"strategy": "evolutionary", "budget": 7}).filter
    assert evo.search_settings() == {
        "strategy": "evolutionary",
        "budget": 7,
        "sigma0": pytest.approx(1 / 6),
        "seed": 42,
        "layer_groups": 0,
        "search_density": False,
    }
    greedy = cfg(filter={"strategy": "coefficient", "proxy_limit": 9}).filter
    assert greedy.search_settings() == {
        "strategy": "coefficient",
        "grid": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        "min_gain": 0.0,
    }


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"filter": {"strategy": "coefficient", "budget": 10}},
            "glue.yaml: filter.budget: unknown key of strategy coefficient (allowed: grid, ",
        ),
        (
            {"filter": {"strategy": "evolutionary", "grid": [0.5]}},
            "glue.yaml: filter.grid: unknown key of strategy evolutionary (allowed: budget, ",
        ),
        (
            {"filter": {"strategy": "greedy"}},
            "glue.yaml: filter.strategy: unknown value 'greedy' (allowed: 'average', ",
        ),
        (
            {"mixture": {"router": "random", "top_k": 2}},
            "glue.yaml: mixture.top_k: unknown key of variant model_level (allowed: layer, ",
        ),
        (
            {"mixture": {"variant": "ffn_moe", "router": "random", "layer": 2}},
            "glue.yaml: mixture.layer: unknown key of variant ffn_moe (allowed: prompts, ",
        ),
        (
            {"mixture": {"variant": "ffn_moe", "router": "linear"}},
            "glue.yaml: mixture: router: linear is fitted for mixtures that route whole "
            "samples; ffn_moe takes cheap_embed, hidden, random",
        ),
        (
            {"mixture": {"variant": "hybrid", "router": "random"}},
            "glue.yaml: mixture: hybrid_k: the hybrid variant needs hybrid_k >= 1",
        ),
        (
            {"mixture": {"variant": "ffn_moe", "router": "random", "top_k": 0}},
            "glue.yaml: mixture.top_k: Input should be greater than or equal to 1",
        ),
        (
            {"mixture": {"variant": "moe"}},
            "glue.yaml: mixture.variant: unknown value 'moe' (allowed: 'block_level', ",
        ),
        (
            {"mixture": {"router": "hiden"}},
            "glue.yaml: mixture: router: unknown router 'hiden' (allowed: cheap_embed, ",
        ),
        (
            {"mixture": {"variant": "ffn_moe"}},
            "glue.yaml: mixture.prompts: the 'hidden' router needs example prompts per task",
        ),
        (
            {"merge": {"method": "ties", "params": {"densty": 0.5}}},
            "glue.yaml: merge: params.densty: merge method 'ties' has no parameter 'densty' "
            "(allowed: weight, density",
        ),
        (
            {"merge": {"method": "ties", "params": {"density": 1.5}}},
            "glue.yaml: merge: params.density: density=1.5 is above its maximum 1.0",
        ),
        (
            {"merge": {"method": "ties"}},
            "glue.yaml: merge.params.density: merge method 'ties' requires it (density (float, "
            "per model, required",
        ),
        (
            {"merge": {"method": "linear", "dtype": "float8"}},
            "glue.yaml: merge: dtype: unknown dtype 'float8'",
        ),
    ],
)
def test_settings_of_another_entry_or_a_bad_value_are_one_line_errors(sections, message):
    assert error(**sections).startswith(message)


def test_a_parameter_the_search_sets_need_not_be_given():
    c = cfg(
        merge={"method": "ties"},
        filter={"strategy": "evolutionary", "search_density": True},
    )
    assert c.merge.params == {}


def test_glue_mix_files_are_validated_by_the_same_settings(tmp_path):
    from model_glue.mixture.errors import MixtureError
    from model_glue.mixture.mix_file import load_mix_file

    def load(text: str) -> str:
        (tmp_path / "mix.yaml").write_text(text)
        with pytest.raises(MixtureError) as e:
            load_mix_file(tmp_path / "mix.yaml")
        return str(e.value).removeprefix(f"{tmp_path / 'mix.yaml'}: ")

    head = "experts: [a, b]\nrouter: random\n"
    assert load(head + "variant: ffn_moe\nlayer: 2\n").startswith("layer: Extra inputs")
    assert load(head + "variant: model_level\nselect_experts: true\n") == (
        "select_experts: a run configuration's key; glue mix takes none"
    )
    assert load("experts: [a, b]\nvariant: model_level\nrouter: linear\n") == (
        "router: linear is fitted on proxy labels; glue mix has none"
    )
    assert load("experts: [a, b]\nvariant: ffn_moe\n") == (
        "prompts: the 'hidden' router needs example prompts per expert"
    )
    assert load(head + "variant: moe\n").startswith("variant: unknown 'moe' (allowed: block_level")
    (tmp_path / "mix.yaml").write_text(head + "variant: hybrid\nhybrid_k: 1\ntop_k: 1\n")
    spec, _ = load_mix_file(tmp_path / "mix.yaml")
    assert (spec.mixture.variant, spec.mixture.hybrid_k, spec.mixture.top_k) == ("hybrid", 1, 1)
