"""The dress-rehearsal overlay and the per-stage usage line."""

import logging

import jsonschema
import yaml

from llava_reid.usage import StageUsage
from tests.conftest import REPO

PRESETS = REPO / "workflow" / "presets"


def merged(*paths):
    """Snakemake's merge of several --configfile: later files update earlier ones key by key."""

    def update(base, new):
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                update(base[key], value)
            else:
                base[key] = value
        return base

    config = {}
    for path in paths:
        update(config, yaml.safe_load(path.read_text()))
    return config


def test_rehearsal_overlay_is_valid_and_keeps_the_preset_settings():
    preset = merged(REPO / "config.yaml", PRESETS / "interactive-pedes.yaml")
    rehearsal = merged(REPO / "config.yaml", PRESETS / "interactive-pedes.yaml",
                       PRESETS / "rehearsal.yaml")
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    jsonschema.validate(rehearsal, schema)
    # Only paths, the answerer, the run name and the chunk count may differ.
    changed = {(section, key) for section, value in rehearsal.items() if isinstance(value, dict)
               for key in value if value[key] != preset[section][key]}
    changed |= {(section,) for section, value in rehearsal.items()
                if not isinstance(value, dict) and value != preset[section]}
    assert changed == {("run",), ("data", "annotations"), ("data", "image_root"),
                       ("retriever", "pretrained"), ("questioner", "pretrained"),
                       ("answerer", "kind"), ("answerer", "annotated"), ("evaluate", "chunks")}
    assert rehearsal["answerer"]["kind"] == "annotated"
    assert rehearsal["questioner"]["lora"]["rank"] == 128
    assert rehearsal["retriever"]["image_height"] == 384
    assert rehearsal["retriever"]["text_length"] == 192


def test_stage_usage_logs_time_and_no_gpu_figures_without_cuda(caplog, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    usage = StageUsage("train-retriever")
    with caplog.at_level(logging.INFO, logger="llava_reid.usage"):
        figures = usage.report()
    assert set(figures) == {"seconds"}
    assert 0 <= figures["seconds"] < 60
    assert caplog.records[-1].getMessage().startswith("usage train-retriever: seconds=")
