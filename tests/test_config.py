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


DEFAULTED = ("prior_lr", "loss", "pool_dropout")  # selector.warmup keys with a schema default


def test_loading_fills_the_schema_defaults_as_snakemake_validate_does(tmp_path):
    from snakemake.utils import validate

    cfg = repo_config()
    for key in DEFAULTED:
        del cfg["selector"]["warmup"][key]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    by_snakemake = json.loads(json.dumps(cfg))
    validate(by_snakemake, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert load_config(str(path)) == load_config(json.dumps(cfg)) == by_snakemake
    warmup = load_config(str(path))["selector"]["warmup"]
    assert [warmup[k] for k in DEFAULTED] == [0.01, "plackett_luce", 0.0]
    # A value the config sets is kept; an absent section is not created.
    cfg["selector"]["warmup"]["loss"] = "bce"
    assert load_config(json.dumps(cfg))["selector"]["warmup"]["loss"] == "bce"
    assert "selector" not in load_config(json.dumps({"seed": 1}))


def test_a_view_gets_defaults_only_under_the_keys_its_stage_reads():
    from llava_reid.stage_views import stage_keys

    warmup = {k: v for k, v in repo_config()["selector"]["warmup"].items() if k not in DEFAULTED}
    view = {"seed": 1, "selector": {"heads": 4, "dropout": 0.0, "warmup": warmup}}
    # import-selector passes selector.heads and selector.dropout, not selector.warmup.
    assert load_config(json.dumps(view), stage_keys("import-selector")) == view
    filled = load_config(json.dumps(view), stage_keys("warmup-selector"))
    assert set(filled["selector"]["warmup"]) == set(warmup) | set(DEFAULTED)
