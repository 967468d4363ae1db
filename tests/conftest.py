"""Shared fixtures: a small config and a small synthetic dataset built through the real CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

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
    q["sft"].update(epochs=1, batch_size=16, checkpoint_every=5, eval_prompts=16)
    cfg["evaluate"]["generation"].update(max_new_tokens=12)
    cfg["dialogue"].update(rounds=3, pool_size=20)
    s = cfg["selector"]
    s.update(layers=1, heads=2, ffn=32)
    s["warmup"].update(epochs=2)
    cfg["joint"].update(batch_size=16, checkpoint_every=5)
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
