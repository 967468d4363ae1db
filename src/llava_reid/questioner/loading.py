"""Loading the questioner for training, shared by train-questioner and train-joint: the base
model (optionally 4-bit), its LoRA adapter, and the visual tokens of candidate images.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava_reid.data.annotations import read_annotations
from llava_reid.questioner.model import Questioner, attention_implementation
from llava_reid.questioner.vision import visual_tokens
from llava_reid.questioner.visual_cache import VisualTokenCache

log = logging.getLogger(__name__)


def lora_target_regex(modules: list[str]) -> str:
    """peft target: the named linear layers inside the language model only."""
    names = "|".join(re.escape(m) for m in modules)
    return rf".*language_model\..*\.({names})$"


def load_base(model: str, qcfg: Mapping[str, Any], device: torch.device) -> Questioner:
    """The base questioner, 4-bit when asked and possible, else the device's dtype (``qcfg``:
    the ``questioner`` section)."""
    if qcfg["load_in_4bit"]:
        if device.type == "cuda":
            try:
                return _load_4bit(model, qcfg, device)
            except ImportError:
                log.warning("load_in_4bit asked for but bitsandbytes is missing: loading bf16")
        else:
            log.warning("load_in_4bit needs a GPU: loading the full-precision model")
    return Questioner.from_pretrained(model, qcfg, device)


def _load_4bit(model: str, qcfg: dict[str, Any], device: torch.device) -> Questioner:
    import bitsandbytes  # noqa: F401
    from peft import prepare_model_for_kbit_training
    from transformers import (
        AutoTokenizer,
        BitsAndBytesConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
    )
    net = LlavaOnevisionForConditionalGeneration.from_pretrained(
        model, quantization_config=quant, dtype=torch.bfloat16, use_safetensors=True,
        attn_implementation=attention_implementation(device), device_map={"": device},
    )
    net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    return Questioner(net, AutoTokenizer.from_pretrained(model), qcfg, device)


def attach_lora(q: Questioner, qcfg: dict[str, Any], adapter: str | None = None) -> None:
    """A new LoRA adapter from the config, or continue training ``adapter``."""
    from peft import LoraConfig, get_peft_model

    for p in q.net.parameters():
        p.requires_grad_(False)
    if adapter:
        q.load_adapter(adapter, trainable=True)
    else:
        lora = qcfg["lora"]
        save = list(lora["modules_to_save"])
        if qcfg["train_projector"]:
            save.append("multi_modal_projector")
        q.net = get_peft_model(q.net, LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora_target_regex(lora["target_modules"]),
            modules_to_save=save or None, bias="none",
        ))
    if qcfg["sft"]["gradient_checkpointing"]:
        q.base.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


class ImageTokens:
    """Visual tokens of candidate images: from the cache, or online when the projector
    trains (gradients must reach it)."""

    def __init__(self, q: Questioner, cache: VisualTokenCache | None, paths: dict[int, Path]):
        self.q, self.cache, self.paths = q, cache, paths

    @classmethod
    def for_training(cls, q: Questioner, qcfg: dict[str, Any], visual_tokens: str,
                     annotations: str, image_root: str) -> ImageTokens:
        """The cache (checked against the model's visual weights) when the projector is
        frozen; the training images when it trains."""
        if not qcfg["train_projector"]:
            cache = VisualTokenCache(visual_tokens, q.device)
            cache.check_model(q)
            return cls(q, cache, {})
        rows = read_annotations(annotations, split="train")
        paths = {int(i): Path(image_root) / p
                 for i, p in zip(rows.image_idx, rows.file_path, strict=True)}
        return cls(q, None, paths)

    def __call__(self, image_ids: list[list[int]]) -> list[list[torch.Tensor]]:
        if self.cache is not None:
            return [self.cache.tokens(ids) for ids in image_ids]
        flat = [i for ids in image_ids for i in ids]
        images = []
        for i in flat:
            with Image.open(self.paths[i]) as img:
                images.append(img.convert("RGB"))
        pixels, sizes = self.q.preprocess.batch(images)
        dtype = next(self.q.base.model.vision_tower.parameters()).dtype
        tokens = visual_tokens(self.q.base, pixels.to(self.q.device, dtype), sizes,
                               self.q.pool_ratio)
        out, k = [], 0
        for ids in image_ids:
            out.append(tokens[k : k + len(ids)])
            k += len(ids)
        return out
