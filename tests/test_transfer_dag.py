"""Transfer runs as DAGs (dry runs on hand-made sample files): the presets take every model
from the earlier run, schedule no training job and encode the test split only; a transfer
config that cannot work stops with a clear error."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from llava_reid.config import load_yaml
from tests.conftest import REPO, dry_run, planned_jobs, sglang_stand_in_env, write_config
from tests.test_transfer_datasets import cuhk_sample, icfg_sample, rstp_sample

TRAINING_RULES = {"init_retriever", "train_retriever", "prepare_data", "train_questioner",
                  "warmup_selector", "train_joint", "build_tiny_questioner", "synthesize_data"}
SAMPLES = {"cuhk-pedes": cuhk_sample, "icfg-pedes": icfg_sample, "rstpreid": rstp_sample}


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merged(base[key], value)
        else:
            out[key] = value
    return out


def _preset_config(work: Path, fmt: str) -> dict:
    """The preset on top of config.yaml, its /path/to/ entries pointing at hand-made files."""
    data = SAMPLES[fmt](work / "datasets")
    text = (REPO / f"workflow/presets/transfer-{fmt}.yaml").read_text()
    text = text.replace(f"/path/to/{data.name}", str(data))
    text = text.replace("/path/to/models", str(work / "models"))
    cfg = _merged(load_yaml((REPO / "config.yaml").read_text()), load_yaml(text))
    assert "/path/to" not in yaml.safe_dump(cfg)
    (work / "models/llava-onevision-qwen2-7b-ov-hf").mkdir(parents=True)
    earlier = work / "results/interactive-pedes"
    (earlier / "retriever/model").mkdir(parents=True)
    (earlier / "joint/adapter").mkdir(parents=True)
    (earlier / "joint/selector.safetensors").write_bytes(b"")
    return cfg


def _dry_run(work: Path, cfg: dict) -> subprocess.CompletedProcess:
    return dry_run(work, write_config(work / "transfer.yaml", cfg), env=sglang_stand_in_env(work))


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_transfer_preset_trains_nothing(fmt, tmp_path):
    cfg = _preset_config(tmp_path, fmt)
    jobs = planned_jobs(_dry_run(tmp_path, cfg))
    rules = {r for r, _ in jobs}
    assert not rules & TRAINING_RULES, rules
    assert {"load_annotations", "import_retriever", "import_questioner", "import_selector",
            "cache_features", "cache_visual_tokens", "evaluate", "merge_eval", "plots",
            "ranked_lists"} <= rules
    # Only the test split is encoded, for the gallery and for the questioner.
    assert {w for r, w in jobs if r in ("cache_features", "cache_visual_tokens")} == {
        "split=test"}
    assert {re.search(r"method=(\w+)", w).group(1) for r, w in jobs if r == "evaluate"} == {
        "initial", "selector"}


def test_auxiliary_similarity_is_an_input_of_evaluation(tmp_path):
    cfg = _preset_config(tmp_path, "rstpreid")
    aux = tmp_path / "irra_similarity.npz"
    aux.write_bytes(b"")
    cfg["evaluate"]["auxiliary_similarity"]["path"] = str(aux)
    proc = _dry_run(tmp_path, cfg)
    planned_jobs(proc)
    blocks = [b for b in re.split(r"\n(?=rule \w+:)", proc.stdout)
              if b.startswith(("rule evaluate:", "rule merge_eval:"))]
    assert blocks and all(str(aux) in b for b in blocks)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["retriever"].update(checkpoint=None), "retriever.checkpoint is not set"),
    (lambda c: c["evaluate"].update(methods=["initial", "oracle"]),
     r"evaluate.methods \['oracle'\] ask annotated questions"),
    (lambda c: c["answerer"].update(input="memory"), "answerer.input must be 'image'"),
])
def test_transfer_config_that_cannot_work_is_refused(tmp_path, edit, message):
    cfg = _preset_config(tmp_path, "icfg-pedes")
    edit(cfg)
    proc = _dry_run(tmp_path, cfg)
    assert proc.returncode != 0
    assert re.search(message, proc.stdout + proc.stderr), proc.stderr[-3000:]
