"""``import-questioner``: a published LoRA adapter -> this workflow's questioner adapter.

- ``llava-reid``: the original's adapter (keys and config rewritten, see ``original_layout``);
  the projector it trained in full comes along as a saved module.
- ``ours``: an earlier run's ``questioner/adapter`` or ``joint/adapter``, checked and copied.

With ``--model`` every tensor is checked against the base model's modules and shapes first.
An adapter that carries a trained projector needs ``questioner.train_projector: true`` in the
workflow, so that evaluation's visual tokens come from that projector.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from llava_reid.artifacts import atomic_dir, write_json
from llava_reid.questioner.original_layout import (
    CONFIG_FILE,
    PEFT_PREFIX,
    base_model_layout,
    check_against_model,
    convert_config,
    lora_modules,
    map_state_dict,
    read_adapter,
)

log = logging.getLogger(__name__)

PROJECTOR = "model.multi_modal_projector."


def run(cfg: dict[str, Any], source: str, path: str, out: str, model: str | None = None,
        metrics: str | None = None) -> None:
    config, state = read_adapter(path)
    if source == "llava-reid":
        state = map_state_dict(state, path)
        config = convert_config(config, state, path, model)
    elif source != "ours":
        raise ValueError(f"import-questioner: unknown format {source!r} (llava-reid or ours)")
    if not lora_modules(state):
        raise ValueError(f"{path}: the adapter holds no LoRA tensors")
    if model:
        modules, params = base_model_layout(model)
        check_against_model(state, modules, params, path)
    projector = any(k.startswith(PEFT_PREFIX + PROJECTOR) for k in state)
    qcfg = cfg.get("questioner", {})
    if projector and qcfg.get("train_projector") is False:
        raise ValueError(f"{path}: the adapter carries a trained projector; set "
                         "questioner.train_projector: true so evaluation's visual tokens use it")
    with atomic_dir(out) as tmp:
        if source == "ours":
            shutil.copytree(path, tmp, dirs_exist_ok=True)
        else:
            save_file({k: v.contiguous() for k, v in state.items()},
                      str(Path(tmp) / "adapter_model.safetensors"))
            (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    summary = {
        "imported": {"format": source, "path": str(path)},
        "lora_modules": len(lora_modules(state)),
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "modules_to_save": config.get("modules_to_save") or [],
        "projector": projector,
    }
    log.info("imported adapter %s: %d LoRA modules, rank %s, saved modules %s", path,
             summary["lora_modules"], summary["rank"], summary["modules_to_save"])
    if metrics:
        write_json(summary, metrics)
