"""build-tiny-questioner: a tiny LLaVA-OneVision and its tokenizer for the embedded default.

The real questioner is LLaVA-OneVision-Qwen2-7B (HF format) in a local folder. The embedded
default cannot download it, so this stage builds the same architecture at toy size (a SigLIP
vision tower, the projector, image newline and a Qwen2 decoder, random weights, seeded), trains a
byte-level BPE with the ChatML and image special tokens on the training split's text plus the
prompt templates, and saves both with ``save_pretrained``. Every later stage then loads it with
``from_pretrained`` exactly as it would load the 7B model.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava_reid.artifacts import atomic_dir
from llava_reid.data.annotations import training_corpus
from llava_reid.questioner import prompts as P
from llava_reid.runtime import seed_everything
from llava_reid.tokenization import train_bpe_tokenizer

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
EXTRA_TOKENS = [P.IM_START, P.IM_END, P.IMAGE_TOKEN, "<video>"]


def prompt_corpus() -> list[str]:
    """The fixed prompt text, so the tokenizer knows the instruction words."""
    texts = [P.SYSTEM, *P.PREAMBLES, *P.INSTRUCTIONS]
    texts += ["[Candidate person]", "[Similar persons] #1: #2: #3:", "[Conversation]",
              "Witness: You: I don't know.", "system user assistant"]
    return texts


def build_tiny_questioner(tiny: dict[str, Any], corpus: list[str], seed: int):
    tokenizer = train_bpe_tokenizer(
        corpus + prompt_corpus() * 20,
        vocab_size=tiny["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        extra_special_tokens=EXTRA_TOKENS,
        model_max_length=tiny["max_positions"],
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=tiny["hidden_size"],
        intermediate_size=tiny["intermediate_size"],
        num_hidden_layers=tiny["layers"],
        num_attention_heads=tiny["heads"],
        num_key_value_heads=tiny["kv_heads"],
        max_position_embeddings=tiny["max_positions"],
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(P.IM_END),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(
        hidden_size=tiny["vision_hidden_size"],
        intermediate_size=2 * tiny["vision_hidden_size"],
        num_hidden_layers=tiny["vision_layers"],
        num_attention_heads=tiny["vision_heads"],
        image_size=tiny["image_size"],
        patch_size=tiny["patch_size"],
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids(P.IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    seed_everything(seed)
    return LlavaOnevisionForConditionalGeneration(config), tokenizer


def run(cfg: dict[str, Any], annotations: str, out: str) -> None:
    qcfg = cfg["questioner"]
    model, tokenizer = build_tiny_questioner(qcfg["tiny"], training_corpus(annotations),
                                             cfg["seed"])
    n = sum(p.numel() for p in model.parameters())
    log.info("tiny LLaVA-OneVision: %.2f M parameters, vocab %d", n / 1e6, len(tokenizer))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
