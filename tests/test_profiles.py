"""`snakemake --profile slurm` as users type it, after `llava-reid install-profile`, and the
install command itself (link, copy, idempotence, never replacing someone's profile).

The lookup tests run real dry runs (`-n`, no sbatch needed) against a copy of the repository
(a fresh clone's root) with Snakemake's user config folder moved to a temporary one
(XDG_CONFIG_HOME), so nothing under the real ~/.config is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_reid.snakemake_profile import ProfileInstallError, install_profile
from tests.conftest import REPO

BIN = Path(sys.executable).parent
CLONE_ITEMS = ["Snakefile", "config.yaml", "rules", "workflow", "envs", "profiles"]


def _env(config_home: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CONFIG_HOME": str(config_home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def clone(tmp_path) -> Path:
    root = tmp_path / "llava-reid"
    root.mkdir()
    for item in CLONE_ITEMS:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns(".snakemake"))
        else:
            shutil.copy2(src, root / item)
    return root


def _assert_slurm_dry_run(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Using profiles slurm and workflow specific profile" in out, out[:500]
    # The profile's settings reached the jobs: its partition and per-rule resources.
    assert "slurm_partition=gpu" in out
    assert "runtime=180, cpus_per_task=8" in out  # train_retriever's set-resources
    total = [line for line in out.splitlines() if line.startswith("total")]
    assert total and int(total[0].split()[-1]) > 10, out[-2000:]


def test_profile_by_name_from_the_repository_root_and_elsewhere(clone, tmp_path):
    config_home = tmp_path / "xdg"
    env = _env(config_home)
    dry_run = ["snakemake", "--profile", "slurm", "-n"]

    # A fresh clone: Snakemake does not know the name yet (the error users saw).
    before = _run(dry_run, clone, env)
    assert before.returncode != 0
    assert "profile directory given (slurm)" in before.stderr

    # The documented one-time step.
    step = _run(["llava-reid", "install-profile", "--source", str(clone / "profiles" / "slurm")],
                clone, env)
    assert step.returncode == 0, step.stderr
    target = config_home / "snakemake" / "slurm"
    assert target.is_symlink() and target.resolve() == (clone / "profiles" / "slurm").resolve()
    assert f"Linked {target} -> " in step.stdout

    _assert_slurm_dry_run(_run(dry_run, clone, env))

    elsewhere = tmp_path / "run-dir"
    elsewhere.mkdir()
    _assert_slurm_dry_run(_run(
        [*dry_run, "--snakefile", str(clone / "Snakefile"),
         "--configfile", str(clone / "config.yaml")], elsewhere, env))


def test_plain_snakemake_uses_the_default_workflow_profile(clone, tmp_path):
    proc = _run(["snakemake", "-n"], clone, _env(tmp_path / "xdg"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Using workflow specific profile profiles/default" in proc.stderr
    assert yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())[
        "cores"] == "all"


def test_default_profile_keeps_slurm_settings():
    """A workflow profile overrides a --profile key by key: profiles/default may only hold keys
    that profiles/slurm does not set, or sets to the same value (cores is not in slurm's)."""
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert "default-resources" not in default and "executor" not in default
    for key, value in default.items():
        assert slurm.get(key, value) == value, key
    assert set(default) - set(slurm) == {"cores"}


def test_install_links_and_is_idempotent(tmp_path):
    source = REPO / "profiles" / "slurm"
    first = install_profile(dest=tmp_path)
    assert first.action == "linked" and first.source == source.resolve()
    assert (tmp_path / "slurm").resolve() == source.resolve()
    again = install_profile(dest=tmp_path)
    assert again.action == "already linked"
    assert "Already linked" in again.message()


def test_install_copy_and_other_name(tmp_path):
    done = install_profile(dest=tmp_path, name="mycluster", copy=True)
    target = tmp_path / "mycluster"
    assert done.action == "copied" and target.is_dir() and not target.is_symlink()
    assert (target / "config.yaml").read_bytes() == (
        REPO / "profiles" / "slurm" / "config.yaml").read_bytes()
    assert install_profile(dest=tmp_path, name="mycluster", copy=True).action == "already copied"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over


def test_install_never_replaces_an_existing_profile(tmp_path):
    mine = tmp_path / "slurm"
    mine.mkdir()
    (mine / "config.yaml").write_text("executor: slurm\njobs: 7\n")
    with pytest.raises(ProfileInstallError, match=r"already exists \(a folder\).*--name NAME"):
        install_profile(dest=tmp_path)
    assert (mine / "config.yaml").read_text() == "executor: slurm\njobs: 7\n"

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.yaml").write_text("jobs: 1\n")
    (tmp_path / "linked").symlink_to(other)
    with pytest.raises(ProfileInstallError, match="a link to"):
        install_profile(dest=tmp_path, name="linked")
    assert (tmp_path / "linked").resolve() == other.resolve()


def test_install_rejects_a_folder_that_is_not_a_profile(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileInstallError, match="no config.yaml"):
        install_profile(source=tmp_path / "empty", dest=tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_cli_refusal_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "slurm").mkdir()
    proc = _run(["llava-reid", "install-profile", "--dest", str(tmp_path)], REPO,
                _env(tmp_path / "xdg"))
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("llava-reid install-profile: ")
    assert len(proc.stderr.strip().splitlines()) == 1
