"""Shared fixtures: a small config, a small synthetic dataset built through the real CLI, one
small trained run built by the real DAG, and the helpers that run Snakemake on the Snakefile."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"

# Keep every test offline, whatever the machine's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def base_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def answerer_config(**changes) -> dict:
    """config.yaml's ``answerer`` section (what a validated config holds) with ``changes``: a
    top-level key replaced, or a sub-section (``openai``, ``sglang``, ``annotated``) updated."""
    acfg = copy.deepcopy(base_config()["answerer"])
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(acfg.get(key), dict):
            acfg[key].update(value)
        else:
            acfg[key] = value
    return acfg


def small_config() -> dict:
    """The embedded default shrunk so a whole stage takes seconds."""
    cfg = copy.deepcopy(base_config())
    syn = cfg["data"]["synthetic"]
    syn["identities"] = {"train": 24, "val": 8, "test": 10}
    syn["images_per_identity"] = 2
    r = cfg["retriever"]
    r["tiny"].update(embed_dim=32, hidden_size=32, vision_layers=1, text_layers=1, heads=2,
                     vocab_size=400)
    r.update(epochs=3, batch_size=16, warmup_epochs=1, text_length=48)
    r["losses"]["mlm"] = 0.5  # every retriever loss is exercised
    q = cfg["questioner"]
    q["tiny"].update(hidden_size=32, intermediate_size=64, layers=1, heads=2, kv_heads=1,
                     vocab_size=400, vision_hidden_size=16, vision_layers=1, vision_heads=2,
                     image_size=32, patch_size=8)
    q["lora"].update(rank=8, alpha=16)
    q["sft"].update(epochs=1, batch_size=16, checkpoint_every=2, eval_prompts=16)
    cfg["evaluate"]["generation"].update(max_new_tokens=12)
    cfg["dialogue"].update(rounds=3, pool_size=20)
    s = cfg["selector"]
    s.update(layers=1, heads=2, ffn=32)
    s["warmup"].update(epochs=2)
    cfg["joint"].update(batch_size=16, checkpoint_every=2)
    return cfg


def llava_reid(*args: str, cfg: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run one stage through the real CLI, as the rules do."""
    cmd = [sys.executable, "-m", "llava_reid.cli", args[0], "--config", json.dumps(cfg), *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:1])} failed:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> dict:
    """Synthetic images + validated annotations.parquet for the small config."""
    root = tmp_path_factory.mktemp("small_data")
    cfg = small_config()
    llava_reid("synthesize", "--out-dir", str(root), cfg=cfg)
    parquet = root / "annotations.parquet"
    llava_reid("load-annotations", "--annotations", str(root / "annotations.json"),
               "--image-root", str(root), "--out", str(parquet), cfg=cfg)
    return {"root": root, "annotations": parquet, "cfg": cfg}


def sglang_stand_in_env(folder: Path) -> dict[str, str]:
    """The environment for a dry run of a config whose answerer is SGLang on a machine without
    it: $LLAVA_REID_SGLANG_PYTHON names a stand-in interpreter that finds every module (the DAG's
    runtime check asks it; no job runs)."""
    python = folder / "sglang-python"
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    return {**os.environ, "LLAVA_REID_SGLANG_PYTHON": str(python)}


# -- Snakemake --------------------------------------------------------------------------------


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(work: Path, *args: str, configfiles: Sequence[Path] = (), cores: int = 2,
              check: bool = True, popen: bool = False, env: dict[str, str] | None = None,
              timeout: float = 3000):
    """`snakemake` on the project's Snakefile with ``work`` as its working directory; ``args``
    are targets and further options. ``popen``: started in its own process group (a test can
    Ctrl-C it) with stdout and stderr on one pipe."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
           "--directory", str(work)]
    if configfiles:  # --configfile takes every word up to the next option
        cmd += ["--configfile", *map(str, configfiles)]
    cmd += ["--cores", str(cores), *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-6000:]}")
    return proc


def dry_run(work: Path, *configfiles: Path, args: Sequence[str] = (),
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`snakemake --dry-run` (exit status not checked: some tests expect a refusal)."""
    return snakemake(work, "--dry-run", *args, configfiles=configfiles, cores=1, check=False,
                     env=env, timeout=600)


def planned_jobs(proc: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    """(rule, its wildcards as printed, or "") of every job a dry run planned."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block.strip())
        if rule:
            wildcards = re.search(r"wildcards:\s*(.*)", block)
            jobs.append((rule.group(1), wildcards.group(1).strip() if wildcards else ""))
    return jobs


def planned_rules(proc: subprocess.CompletedProcess) -> set[str]:
    return {rule for rule, _ in planned_jobs(proc)}


def planned_inputs(proc: subprocess.CompletedProcess, rule: str) -> dict[str, str]:
    """A dry run's jobs of ``rule``: their wildcards as printed -> their input line."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout):
        if re.match(rf"(?:local)?rule {rule}:", block.strip()):
            wildcards = re.search(r"wildcards:\s*(.*)", block)
            inputs = re.search(r"input:\s*(.*)", block)
            jobs[wildcards.group(1).strip() if wildcards else ""] = (
                inputs.group(1) if inputs else "")
    return jobs


# -- one small trained run, shared ----------------------------------------------------------

TRAINED_RUN_METHODS = ["initial", "random", "oracle", "questioner", "selector"]


def trained_run_config() -> dict:
    """The small config as the shared trained run is built: every method, and two evaluation
    chunks (test_workflow compares them with one and three)."""
    cfg = small_config()
    cfg["evaluate"].update(chunks=2, methods=list(TRAINED_RUN_METHODS))
    # test_import_weights exports this run to the published formats. IRRA's stores no head count
    # (OpenAI's CLIP: width / 64): the tiny CLIP follows it. Nor can the original's selector.pth
    # hold a retrieval prior.
    cfg["retriever"]["tiny"].update(hidden_size=64, heads=1)
    cfg["selector"]["retrieval_prior"] = False
    return cfg


def _run_info(work: Path, cfg: dict, cfg_file: Path) -> dict:
    return {"work": work, "cfg": cfg, "cfg_file": cfg_file,
            "run": work / cfg["results"] / cfg["run"]}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """`snakemake` (every target) on :func:`trained_run_config`, built once per session.

    Read-only for every test: one that changes the run (moves, forces or interrupts jobs, runs
    further targets in its folder) works on :func:`copy_of_trained_run`. ``cfg`` is a fresh
    copy for each caller; work: the working directory; run: the run's results folder."""
    work = tmp_path_factory.mktemp("trained_run")
    cfg = trained_run_config()
    cfg_file = write_config(work / "config.yaml", cfg)
    snakemake(work, configfiles=[cfg_file])
    return _SharedRun(_run_info(work, cfg, cfg_file))


class _SharedRun(dict):
    """The shared run's paths; each lookup of "cfg" gives a fresh deep copy, so no test can
    change what the next one reads."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return copy.deepcopy(value) if key == "cfg" else value


def copy_of_trained_run(trained_run: dict, dest: Path) -> dict:
    """A private copy of the shared run's whole working directory, .snakemake/ included, file
    times kept (copy2): Snakemake sees it as finished, and a test may change it freely. Hard
    links would not do: jobs rewrite their logs and Snakemake its metadata in place."""
    shutil.copytree(trained_run["work"], dest, symlinks=True, copy_function=shutil.copy2)
    cfg_file = dest / trained_run["cfg_file"].name
    leftover = planned_rules(dry_run(dest, cfg_file)) - {"all"}
    assert not leftover, f"the copied run is not finished for Snakemake: {leftover}"
    return _run_info(dest, trained_run["cfg"], cfg_file)
