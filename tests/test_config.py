import pytest

from model_glue.config import ConfigError, load_config, parse_config

GOOD = """
name: demo
zoo:
  - {name: base, path: models/base}
  - {name: ft, path: models/ft, base: base}
similarity: {tensors: [attn, mlp], threshold: 0.9}
merge: {method: linear}
evaluation: {tasks: [demo_add], limit: 20}
"""


def _write(tmp_path, text):
    p = tmp_path / "glue.yaml"
    p.write_text(text)
    return p


def test_valid_config_resolves_paths_relative_to_the_file(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.zoo[1].path == str((tmp_path / "models/ft").resolve())
    assert cfg.similarity.threshold == 0.9 and cfg.similarity.groups == ["attn", "mlp"]
    assert cfg.evaluation.limit == 20


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace("threshold: 0.9", "treshold: 0.9"),
            r"glue.yaml: similarity.treshold: unknown key \(allowed: exact, metric, tensors, threshold\)",
        ),
        (GOOD + "extra: 1\n", r"glue.yaml: extra: unknown key \(allowed: .*evaluation.*zoo"),
        (
            GOOD.replace("method: linear", "method: linaer"),
            r"merge.method: unknown merge method 'linaer' \(allowed: .*linear",
        ),
        (
            GOOD.replace("base: base}", "base: nobody}"),
            r"zoo model 'ft': base 'nobody' is not a zoo model",
        ),
        (GOOD.replace("name: ft", "name: base"), r"model name 'base' appears twice"),
        (
            GOOD.replace("threshold: 0.9", "threshold: 1.9"),
            r"glue.yaml: similarity.threshold: must be a number in \[0, 1\] or 'auto', got 1.9$",
        ),
        (
            GOOD.replace("tensors: [attn, mlp]", "tensors: [attn, norms]"),
            r"similarity.tensors.1: Input should be 'attn', 'mlp' or 'embed'",
        ),
        (
            GOOD.replace(
                "  - {name: ft, path: models/ft, base: base}\n", "  - {name: ft, base: base}\n"
            ),
            r"zoo.1: zoo model .ft.: give either path or repo",
        ),
        ("zoo: [\n", r"malformed YAML"),
        ("- a\n- b\n", r"expected a mapping"),
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_parse_without_file():
    cfg = parse_config({"zoo": [{"name": "a", "path": "/x"}], "evaluation": {"tasks": ["t"]}})
    assert cfg.merge.method == "linear" and cfg.similarity.threshold == "auto"


def test_mixture_pooling_defaults_and_limits_follow_the_variant():
    base = {"zoo": [{"name": "a", "path": "/x"}], "evaluation": {"tasks": ["t"]}}
    mix = {"router": "random"}
    assert parse_config(base | {"mixture": mix}).mixture.pooling == "last"
    block = parse_config(base | {"mixture": mix | {"variant": "block_level"}}).mixture
    assert block.pooling == "mean"
    with pytest.raises(ConfigError, match="mixture.pooling: Input should be 'mean' or 'first'"):
        parse_config(base | {"mixture": mix | {"variant": "block_level", "pooling": "last"}})
