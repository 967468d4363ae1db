"""Loading and validating the workflow config: the CLI's --config and the Snakefile's check.

The schema is workflow/schemas/config.schema.yaml, the file the Snakefile validates against;
wheels ship it inside the package (setup.py copies it at build time), so an installed package
validates against the same file. Errors say which key is wrong and why, one line per problem.
Like Snakemake's ``validate``, loading fills the schema's ``default:`` values in, so a stage run
by hand reads the same settings as one run by the workflow, and the schema is their one source.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from llava_reid.consistency import problems
from llava_reid.stage_views import passed_tree

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
    """The config does not match the schema, or its keys contradict each other."""


def schema_path() -> Path:
    """The workflow's schema in a source checkout, else the copy built into the package."""
    repo = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / SCHEMA_NAME
    if repo.exists():
        return repo
    packaged = Path(str(resources.files("llava_reid") / SCHEMA_NAME))
    if not packaged.exists():
        raise ConfigError(f"{packaged}: the config schema is missing from this installation "
                          "(reinstall llava-reid)")
    return packaged


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(schema_path().read_text(encoding="utf-8"))


def _describe(error: jsonschema.ValidationError) -> str:
    """One line: the dotted key and what is wrong with it (never the schema itself)."""
    key = ".".join(map(str, error.absolute_path)) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return f"{key}: {error.message}; allowed keys: {', '.join(allowed)}"
    return f"{key}: {error.message}"


def _without_required(schema: Any) -> Any:
    """The schema with every ``required`` list dropped (types, ranges, enums and unknown-key
    checks stay)."""
    if isinstance(schema, dict):
        return {k: _without_required(v) for k, v in schema.items() if k != "required"}
    if isinstance(schema, list):
        return [_without_required(v) for v in schema]
    return schema


def fill_defaults(cfg: Any, schema: dict[str, Any], passed: Any = True) -> None:
    """Set, in place, every absent key whose schema entry has a ``default``, inside each object
    ``cfg`` holds: what Snakemake's ``validate`` does to the workflow's config (an absent
    section stays absent). ``passed`` (a :func:`~llava_reid.stage_views.passed_tree`) limits
    the filling to a stage's keys, so a view never gains a key its rule does not pass."""
    if not isinstance(cfg, dict):
        return
    for key, entry in schema.get("properties", {}).items():
        node = passed if passed is True else passed.get(key)
        if not node:
            continue
        if key not in cfg and "default" in entry:
            cfg[key] = copy.deepcopy(entry["default"])
        if key in cfg:
            fill_defaults(cfg[key], entry, node)


def validate_section(cfg: dict[str, Any], source: str, view: bool = False) -> None:
    """Validate the keys present in ``cfg`` against their schema entries.

    Required top-level keys are not enforced (a stage gets only the sections it reads); a
    present section is checked in full, or, for a ``view`` (what the rules pass: the keys one
    stage reads, cut from a config Snakemake has validated whole), only the keys present.
    """
    schema = _without_required(load_schema()) if view else load_schema()
    partial = dict(schema)
    partial["required"] = [k for k in schema.get("required", []) if k in cfg]
    _check(cfg, partial, source)


def _check(cfg: dict[str, Any], schema: dict[str, Any], source: str) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: [str(p) for p in e.path])
    _raise(source, [_describe(e) for e in errors])
    _raise(source, problems(cfg))


def _raise(source: str, lines: list[str]) -> None:
    """One line per problem, each naming the source; the first line alone says enough."""
    if lines:
        shown = lines[:10] + ([f"... and {len(lines) - 10} more"] if len(lines) > 10 else [])
        raise ConfigError("\n".join(f"{source}: {line}" for line in shown))


def check_workflow_config(cfg: dict[str, Any], source: str = "config") -> None:
    """What the Snakefile runs before any job: the whole config against the schema (required
    keys included), then the cross-field checks. Raises ``ConfigError``."""
    _check(cfg, load_schema(), source)


def load_config(value: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """``value`` is inline JSON (what the rules pass: a stage's view, see ``validate_section``)
    or the path of a YAML/JSON config file (its sections are checked in full). The schema's
    defaults are filled in; with ``keys`` (the dotted keys a stage reads) only under those."""
    view = value.lstrip().startswith("{")
    if view:
        source = "--config (inline JSON)"
        try:
            cfg = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: not valid JSON: {err}") from err
    else:
        path = Path(value)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        text, source = path.read_text(encoding="utf-8"), str(path)
        try:
            cfg = json.loads(text) if path.suffix == ".json" else load_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from err
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: config must be a mapping")
    fill_defaults(cfg, load_schema(), True if keys is None else passed_tree(keys))
    validate_section(cfg, source, view=view)
    return cfg
