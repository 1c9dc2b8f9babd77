"""Typed configuration: YAML presets, overrides, clear errors for unknown or ill-typed keys."""

from __future__ import annotations

import pytest

from kadapter.config import ConfigError, load_config, parse_overrides
from kadapter.modeling import AdapterConfig, ModelConfig
from pipelines.common import field_docs, parse_stage_args, usage

BASE = """
preset: demo
seed: 7
model:
  name_or_path: tiny
  tiny_dir: data/models/{preset}-tiny
adapter:
  positions: [0, 11, 23]
  adapter_size: 64
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(BASE)
    return path


def test_loads_typed_sections_and_substitutes_preset(config_file):
    config = load_config(config_file, ["--model.tiny_corpus", "data/{preset}"])
    assert config.model.tiny_corpus == "data/demo"
    assert config.preset == "demo" and config.seed == 7
    assert isinstance(config.model, ModelConfig) and isinstance(config.adapter, AdapterConfig)
    assert config.model.tiny_dir == "data/models/demo-tiny"
    assert config.adapter.heads == 1 and config.adapter.ffn_size == 256
    assert config.to_dict()["adapter"]["positions"] == [0, 11, 23]


@pytest.mark.parametrize(
    "argv, section, expected",
    [
        (["--adapter.adapter_size", "128"], None, {"adapter": {"adapter_size": 128}}),
        (["--adapter_size", "128"], "adapter", {"adapter": {"adapter_size": 128}}),
        (["--positions", "[0,12,24]"], "adapter", {"adapter": {"positions": [0, 12, 24]}}),
        (["--seed=3"], "adapter", {"seed": 3}),
        (["--mlm_head.epochs", "2"], "lama", {"lama": {"mlm_head": {"epochs": 2}}}),
        (["--model.name_or_path", "/m/roberta-large"], "adapter",
         {"model": {"name_or_path": "/m/roberta-large"}}),
    ],
)
def test_parse_overrides(argv, section, expected):
    assert parse_overrides(argv, section) == expected


def test_overrides_apply_on_top_of_the_file(config_file):
    config = load_config(config_file, ["--adapter_size", "128", "--seed", "3"], "adapter")
    assert config.adapter.adapter_size == 128 and config.seed == 3
    assert config.adapter.positions == [0, 11, 23]


@pytest.mark.parametrize(
    "text_or_override, message",
    [
        ("adapter:\n  adapter_sise: 3\n", r"demo.yaml:adapter: unknown key\(s\) \['adapter_sise'\]"),
        ("adaptr:\n  adapter_size: 3\n", r"unknown top-level key\(s\) \['adaptr'\]"),
        ("adapter:\n  adapter_size: big\n", r"adapter.adapter_size: expected int, got 'big'"),
        ("adapter:\n  positions: 3\n", r"adapter.positions: expected a list"),
        ("adapter:\n  input_mode: mean\n", r"'mean' is not one of \['sum', 'concat'\]"),
        ("adapter:\n  adapter_size: 100\n  num_heads: 3\n", r"not divisible by 3 heads"),
        ("seed: true\n", r"seed: expected int"),
        ("model: [1, 2]\n", r"expected a mapping for ModelConfig"),
        ("adapter: {adapter_size: [}\n", r"invalid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text_or_override, message):
    path = tmp_path / "demo.yaml"
    path.write_text(text_or_override)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter_size"], "needs a value"),
        (["adapter_size", "3"], "expected --key value"),
        (["--adapter.nope", "3"], r"demo.yaml \+ command line:adapter: unknown key\(s\) \['nope'\]"),
    ],
)
def test_bad_overrides(config_file, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, argv, "adapter")


def test_stage_args_and_help(config_file, capsys):
    config = parse_stage_args("pipelines.x", "adapter", ["--config", str(config_file), "--dropout", "0"])
    assert config.adapter.dropout == 0.0
    with pytest.raises(ConfigError, match="not found"):
        parse_stage_args("pipelines.x", "adapter", ["--config", "nope.yaml"])
    assert "positions" in field_docs(AdapterConfig)
    # Inherited fields keep their docs: PretrainConfig extends the shared TrainingConfig.
    from kadapter.pretrain import PretrainConfig
    from kadapter.training import TrainingConfig

    inherited = set(field_docs(TrainingConfig))
    assert inherited and inherited <= set(field_docs(PretrainConfig))
    text = usage("pipelines.x", "adapter")
    assert "--init_std: default 0.0002" in text and "close to the identity" in text
    # Nested config dataclasses are expanded field by field.
    lama = usage("pipelines.eval_lama", "lama")
    assert "    --mlm_head.epochs: default" in lama


@pytest.mark.parametrize("preset", ["sample", "paper"])
def test_shipped_presets_load(repo_root, preset):
    config = load_config(repo_root / "configs" / f"{preset}.yaml")
    assert config.preset == preset
    assert config.adapter.positions == [0, 11, 23]
