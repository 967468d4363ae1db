"""Loading and validating the workflow config outside Snakemake (the CLI's --config)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_NAME = "config.schema.yaml"


class _Yaml12FloatLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float, as YAML 1.2 and JSON do (PyYAML follows
    YAML 1.1, where a float needs a dot: ``1.0e-3``)."""


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML with YAML 1.2 floats (``1e-3`` is a number)."""
    return yaml.load(text, _Yaml12FloatLoader)


class ConfigError(ValueError):
    """The config does not match the schema."""


def _schema_path() -> Path:
    # The schema lives in the workflow (workflow/schemas/); the package ships a copy for
    # installs outside the repository.
    repo = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / SCHEMA_NAME
    if repo.exists():
        return repo
    return Path(str(resources.files("llava_reid") / SCHEMA_NAME))


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(_schema_path().read_text())


def _without_required(schema: Any) -> Any:
    """The schema with every ``required`` list dropped (types, ranges, enums and unknown-key
    checks stay)."""
    if isinstance(schema, dict):
        return {k: _without_required(v) for k, v in schema.items() if k != "required"}
    if isinstance(schema, list):
        return [_without_required(v) for v in schema]
    return schema


def validate_section(cfg: dict[str, Any], source: str, view: bool = False) -> None:
    """Validate the keys present in ``cfg`` against their schema entries.

    Required top-level keys are not enforced (a stage gets only the sections it reads); a
    present section is checked in full, or, for a ``view`` (what the rules pass: the keys one
    stage reads, cut from a config Snakemake has validated whole), only the keys present.
    """
    schema = _without_required(load_schema()) if view else load_schema()
    partial = dict(schema)
    partial["required"] = [k for k in schema.get("required", []) if k in cfg]
    validator = jsonschema.Draft202012Validator(partial)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        lines = [f"  {'.'.join(map(str, e.path)) or '<top>'}: {e.message}" for e in errors[:10]]
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines))


def load_config(value: str) -> dict[str, Any]:
    """``value`` is inline JSON (what the rules pass: a stage's view, see ``validate_section``)
    or the path of a YAML/JSON config file (its sections are checked in full)."""
    view = value.lstrip().startswith("{")
    if view:
        cfg, source = json.loads(value), "--config (inline JSON)"
    else:
        path = Path(value)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        text, source = path.read_text(), str(path)
        try:
            cfg = json.loads(text) if path.suffix == ".json" else load_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from err
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: config must be a mapping")
    validate_section(cfg, source, view=view)
    return cfg
