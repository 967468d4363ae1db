"""The original LLaVA-ReID questioner adapter -> a PEFT adapter for our LLaVA-OneVision.

The original trains a PEFT LoRA adapter on LLaVA-NeXT's ``LlavaQwenForCausalLM`` (decoder under
``model.layers.N``, projector ``model.mm_projector.0/2``, SigLIP under
``model.vision_tower.vision_tower.vision_model``) and saves the projector in full
(``modules_to_save``). Our questioner is transformers' ``LlavaOnevisionForConditionalGeneration``
(``model.language_model.layers.N``, ``model.multi_modal_projector.linear_1/2``,
``model.vision_tower``). Saved adapter keys read ``base_model.model.<module>.<tensor>``; the
module part is renamed, the tensor part kept. A key with no counterpart stops the import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# Original module path -> ours, first match wins (matched against ``name + "."``).
MODULE_MAP: tuple[tuple[str, str], ...] = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.mm_projector.", "model.multi_modal_projector."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.image_newline.", "model.image_newline."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
# Tensor names PEFT stores under a LoRA-adapted module.
LORA_TENSOR = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                         r"lora_magnitude_vector)(\.default)?(\.weight)?$")


class UnmappableKey(ValueError):
    """An adapter key (or configured module) with no counterpart in our model."""


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT adapter folder, loaded safely."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r}, expected LORA")
    for name in WEIGHT_FILES:
        path = folder / name
        if path.exists():
            if path.suffix == ".safetensors":
                return config, load_file(str(path))
            return config, torch.load(str(path), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


def map_module(name: str) -> str | None:
    """Our name of an original module (or tensor) path; None when nothing maps."""
    dotted = name + "."
    for old, new in MODULE_MAP:
        if dotted.startswith(old):
            return (new + dotted[len(old):])[:-1]
    return None


def map_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Adapter tensors under our module names; raises naming every key that does not map."""
    out, unmapped = {}, []
    for key, value in state.items():
        if not key.startswith(PEFT_PREFIX):
            unmapped.append(key)
            continue
        body = key[len(PEFT_PREFIX):].replace(".default.", ".")
        mapped = map_module(body)
        if mapped is None:
            unmapped.append(key)
        else:
            out[PEFT_PREFIX + mapped] = value
    if unmapped:
        raise UnmappableKey(f"{source}: adapter keys with no counterpart in LLaVA-OneVision: "
                            f"{sorted(unmapped)[:20]}")
    return out


def map_saved_modules(names: list[str] | None, source: str) -> list[str]:
    mapped, unmapped = [], []
    for name in names or []:
        new = map_module(name)
        (unmapped.append(name) if new is None else mapped.append(new))
    if unmapped:
        raise UnmappableKey(f"{source}: modules_to_save with no counterpart: {unmapped}")
    return mapped


def lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Names (without the PEFT prefix) of the modules that carry LoRA tensors."""
    found = set()
    for key in state:
        match = LORA_TENSOR.search(key)
        if match:
            found.add(key[len(PEFT_PREFIX):match.start()])
    return sorted(found)


def check_against_model(state: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                        params: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor must land on an existing module of matching shape: LoRA A/B on a Linear
    (or an Embedding), saved modules' tensors on a parameter of the same shape."""
    bad = []
    for key, value in state.items():
        body = key[len(PEFT_PREFIX):]
        match = LORA_TENSOR.search(key)
        if match:
            name, kind = body[:match.start() - len(PEFT_PREFIX)], match.group(1)
            module = modules.get(name)
            if isinstance(module, nn.Linear):
                dims = {"lora_A": (None, module.in_features), "lora_B": (module.out_features, None),
                        "lora_magnitude_vector": (module.out_features,)}.get(kind)
            elif isinstance(module, nn.Embedding):
                dims = {"lora_embedding_A": (None, module.num_embeddings),
                        "lora_embedding_B": (module.embedding_dim, None)}.get(kind)
            else:
                bad.append(f"{key} (no Linear/Embedding {name})")
                continue
            shape = tuple(value.shape)
            if dims is None or len(dims) != len(shape) or any(
                    d is not None and d != s for d, s in zip(dims, shape, strict=True)):
                bad.append(f"{key} {shape} does not fit {name}")
        elif body not in params:
            bad.append(f"{key} (no parameter {body})")
        elif tuple(params[body].shape) != tuple(value.shape):
            bad.append(f"{key} {tuple(value.shape)} != {tuple(params[body].shape)}")
    if bad:
        raise UnmappableKey(f"{source}: adapter tensors that do not fit the base model: {bad[:20]}")


def base_model_layout(model_dir: str | Path) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Module and parameter names/shapes of a LLaVA-OneVision folder, without its weights."""
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        net = LlavaOnevisionForConditionalGeneration(config)
    return dict(net.named_modules()), dict(net.named_parameters())


def convert_config(config: dict[str, Any], state: dict[str, torch.Tensor], source: str,
                   base: str | None) -> dict[str, Any]:
    """The adapter config for our model: targets = exactly the modules that carry LoRA
    tensors (the original lists full module names of its own layout)."""
    out = dict(config)
    out["target_modules"] = lora_modules(state)
    out["modules_to_save"] = map_saved_modules(config.get("modules_to_save"), source) or None
    out["base_model_name_or_path"] = str(base) if base else None
    # Loaded as our own adapters are: a plain PeftModel, no task-specific wrapper.
    out["task_type"] = None
    for key in ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern"):
        if out.get(key):
            raise UnmappableKey(f"{source}: adapter_config {key} is not supported by the import")
    return out
