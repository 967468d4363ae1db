"""Published weights as DAG inputs: `<section>.checkpoint` schedules an import in place of
training; IRRA's retriever and the original's questioner adapter and selector convert exactly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, small_config

TRAINING_RULES = {"init_retriever", "train_retriever", "prepare_data", "train_questioner",
                  "warmup_selector", "train_joint"}


def _dry_run(work: Path, cfg: dict, *extra: str) -> subprocess.CompletedProcess:
    cfg_file = work / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(work), "--cores", "1", "--dry-run", "--configfile", str(cfg_file),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _planned_rules(proc: subprocess.CompletedProcess) -> set[str]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return set(re.findall(r"^(?:local)?rule (\w+):", proc.stdout, flags=re.M))


def _fake_checkpoints(work: Path) -> dict[str, Path]:
    paths = {"retriever": work / "irra" / "checkpoint.pth",
             "questioner": work / "original" / "adapter",
             "selector": work / "original" / "selector.pth"}
    paths["retriever"].parent.mkdir(parents=True)
    paths["retriever"].write_bytes(b"")
    paths["questioner"].mkdir(parents=True)
    paths["selector"].write_bytes(b"")
    return paths


def test_checkpoints_replace_every_training_job(tmp_path):
    paths = _fake_checkpoints(tmp_path)
    cfg = small_config()
    cfg["retriever"]["checkpoint"] = {"format": "irra", "path": str(paths["retriever"])}
    cfg["questioner"]["checkpoint"] = {"format": "llava-reid", "path": str(paths["questioner"])}
    cfg["selector"]["checkpoint"] = {"format": "llava-reid", "path": str(paths["selector"])}
    rules = _planned_rules(_dry_run(tmp_path, cfg))
    assert {"import_retriever", "import_questioner", "import_selector", "evaluate",
            "merge_eval", "plots"} <= rules
    assert not rules & TRAINING_RULES, rules
    # Only test-split visual tokens: the train split's exist for training alone.
    proc = _dry_run(tmp_path, cfg)
    assert "visual_tokens/train.safetensors" not in proc.stdout


def test_retriever_checkpoint_alone_keeps_the_rest_of_training(tmp_path):
    paths = _fake_checkpoints(tmp_path)
    cfg = small_config()
    cfg["retriever"]["checkpoint"] = {"format": "ours", "path": str(paths["questioner"])}
    rules = _planned_rules(_dry_run(tmp_path, cfg))
    assert "import_retriever" in rules
    assert not rules & {"init_retriever", "train_retriever"}, rules
    assert {"prepare_data", "train_questioner", "warmup_selector", "train_joint"} <= rules


def test_questioner_checkpoint_without_selector_trains_the_joint_stage_from_it(tmp_path):
    paths = _fake_checkpoints(tmp_path)
    cfg = small_config()
    cfg["questioner"]["checkpoint"] = {"format": "ours", "path": str(paths["questioner"])}
    rules = _planned_rules(_dry_run(tmp_path, cfg))
    assert "import_questioner" in rules and "train_questioner" not in rules
    assert {"train_retriever", "warmup_selector", "train_joint"} <= rules


def test_a_missing_checkpoint_stops_the_dag_naming_the_key(tmp_path):
    cfg = small_config()
    cfg["retriever"]["checkpoint"] = {"format": "irra", "path": str(tmp_path / "nope.pth")}
    proc = _dry_run(tmp_path, cfg)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "retriever.checkpoint.path" in message and "nope.pth" in message


def test_an_unknown_checkpoint_format_fails_validation(tmp_path):
    cfg = small_config()
    cfg["questioner"]["checkpoint"] = {"format": "irra", "path": str(tmp_path)}
    proc = _dry_run(tmp_path, cfg)
    assert proc.returncode != 0
    assert "irra" in proc.stdout + proc.stderr


@pytest.mark.parametrize("section", ["retriever", "questioner", "selector"])
def test_checkpoint_keys_default_to_null(section):
    assert small_config()[section]["checkpoint"] is None
