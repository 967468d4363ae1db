"""The CLI's --config: inline JSON, YAML or JSON files, validated against the schema."""

import json

import pytest
import yaml

from llava_reid.config import ConfigError, load_config, load_schema
from llava_reid.stage_views import METHODS
from tests.conftest import REPO


def repo_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    text = (REPO / "config.yaml").read_text().replace("lr: 2.5e-4", "lr: 1e-3", 1)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg["retriever"]["lr"] == pytest.approx(1e-3)
    assert isinstance(cfg["retriever"]["epochs"], int)


def test_json_file_and_inline_json_load_the_same(tmp_path):
    cfg = repo_config()
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert load_config(str(path)) == load_config(json.dumps(cfg)) == cfg


def test_schema_error_names_the_field(tmp_path):
    cfg = repo_config()
    cfg["retriever"]["epochs"] = "many"
    with pytest.raises(ConfigError, match=r"retriever\.epochs: 'many' is not of type 'integer'"):
        load_config(json.dumps(cfg))


def test_unreadable_config_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not valid json"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_inline_views_are_checked_key_by_key_files_section_by_section(tmp_path):
    """Rules pass a stage's view (dotted sub-keys of a config Snakemake validated whole): its
    keys are type-checked, absent siblings are fine; a config file's sections must be whole."""
    view = {"seed": 1, "device": "cpu", "questioner": {"tiny": repo_config()["questioner"]["tiny"]}}
    assert load_config(json.dumps(view)) == view
    view["questioner"]["tiny"]["layers"] = "two"
    with pytest.raises(ConfigError, match=r"questioner\.tiny\.layers: 'two' is not of type"):
        load_config(json.dumps(view))
    view["questioner"] = {"pool_ratio": 2, "poolratio": 2}
    with pytest.raises(ConfigError, match="poolratio"):
        load_config(json.dumps(view))
    path = tmp_path / "partial.yaml"
    path.write_text(yaml.safe_dump({"seed": 1, "questioner": {"pool_ratio": 2}}))
    with pytest.raises(ConfigError, match=r"questioner: 'pretrained' is a required property"):
        load_config(str(path))


def test_the_schema_allows_exactly_the_methods_the_code_knows():
    methods = load_schema()["properties"]["evaluate"]["properties"]["methods"]
    assert tuple(methods["items"]["enum"]) == METHODS
