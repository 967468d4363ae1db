"""The retriever's starting point, saved with ``save_pretrained`` so training always loads it
with ``CLIPModel.from_pretrained``, at both scales.

- ``retriever.pretrained: null`` (embedded default): a tiny CLIP config with random weights
  (seeded) and a byte-level BPE tokenizer trained on the training split's text.
- ``retriever.pretrained: <local CLIP folder>`` (real preset): that checkpoint, its text
  context stretched to ``text_length`` by linear interpolation of the position embeddings
  (CLIP has 77 positions; the method uses 192), and a ``<|mask|>`` token added for MLM.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from llava_reid.artifacts import atomic_dir
from llava_reid.data.annotations import training_corpus
from llava_reid.retriever.model import use_position_grid
from llava_reid.runtime import seed_everything
from llava_reid.tokenization import train_bpe_tokenizer

log = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "mask_token": MASK_TOKEN,
}


def build_tiny(rcfg: dict[str, Any], corpus: list[str], seed: int):
    tiny = rcfg["tiny"]
    tokenizer = train_bpe_tokenizer(
        corpus,
        vocab_size=tiny["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        lowercase=True,
        model_max_length=rcfg["text_length"],
    )
    width, heads = tiny["hidden_size"], tiny["heads"]
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": tiny["text_layers"],
            "num_attention_heads": heads,
            "max_position_embeddings": rcfg["text_length"],
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "projection_dim": tiny["embed_dim"],
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": tiny["vision_layers"],
            "num_attention_heads": heads,
            # Square position grid of the longer side; interpolated to H x W at run time.
            "image_size": max(rcfg["image_height"], rcfg["image_width"]),
            "patch_size": tiny["patch_size"],
            "projection_dim": tiny["embed_dim"],
        },
        projection_dim=tiny["embed_dim"],
    )
    seed_everything(seed)
    model = CLIPModel(config)
    if tiny["position_init"] == "sincos":
        grid = (rcfg["image_height"] // tiny["patch_size"],
                rcfg["image_width"] // tiny["patch_size"])
        use_position_grid(model, grid)
        table = model.vision_model.embeddings.position_embedding.weight
        with torch.no_grad():
            table.zero_()  # the CLS position
            table[1:] = SINCOS_SCALE * sincos_grid(*grid, width)
    return model, tokenizer


# Random position embeddings start ~10x smaller than a patch token (norm ~0.2 vs ~2.3 at
# init) and a tiny tower trained from scratch never grows them: it ends up a bag of colours.
# Sine-cosine codes at this scale have norm sqrt(width / 2) / 4, i.e. 2.0 at width 128.
SINCOS_SCALE = 0.25


def sincos_grid(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes [rows * cols, dim] (row-major, as the patches):
    a quarter of the channels each for sin and cos of the row and of the column index, at
    geometric frequencies; channels beyond a multiple of four stay zero."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows_at, cols_at = torch.meshgrid(torch.arange(rows, dtype=torch.float32),
                                      torch.arange(cols, dtype=torch.float32), indexing="ij")
    parts = []
    for pos in (rows_at.flatten(), cols_at.flatten()):
        angle = pos[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return F.pad(torch.cat(parts, dim=1), (0, dim - 4 * quarter))


def stretch_text_context(model: CLIPModel, length: int) -> None:
    """Linearly interpolate the text position embeddings to ``length`` positions."""
    emb = model.text_model.embeddings
    old = emb.position_embedding.weight.data
    if old.shape[0] == length:
        return
    new = F.interpolate(old.t()[None], size=length, mode="linear", align_corners=True)[0].t()
    emb.position_embedding = nn.Embedding(length, old.shape[1])
    emb.position_embedding.weight.data.copy_(new)
    emb.register_buffer("position_ids", torch.arange(length)[None], persistent=False)
    model.config.text_config.max_position_embeddings = length


def adapt_pretrained(rcfg: dict[str, Any]):
    path = Path(rcfg["pretrained"])
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: retriever.pretrained is not a local CLIP folder")
    model = CLIPModel.from_pretrained(str(path), use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.config.text_config.vocab_size:
        emb = model.text_model.embeddings.token_embedding
        grown = nn.Embedding(len(tokenizer), emb.weight.shape[1])
        grown.weight.data[: emb.weight.shape[0]] = emb.weight.data
        grown.weight.data[emb.weight.shape[0] :] = emb.weight.data.mean(0)
        model.text_model.embeddings.token_embedding = grown
        model.config.text_config.vocab_size = len(tokenizer)
    # Pool at the real EOS id, never the legacy argmax rule (broken once tokens are added).
    model.config.text_config.eos_token_id = tokenizer.eos_token_id
    model.text_model.eos_token_id = tokenizer.eos_token_id
    stretch_text_context(model, rcfg["text_length"])
    tokenizer.model_max_length = rcfg["text_length"]
    return model, tokenizer


def run(cfg: dict[str, Any], annotations: str, out: str) -> None:
    rcfg = cfg["retriever"]
    if rcfg["pretrained"]:
        model, tokenizer = adapt_pretrained(rcfg)
        log.info("adapted %s: text context %d", rcfg["pretrained"], rcfg["text_length"])
    else:
        model, tokenizer = build_tiny(rcfg, training_corpus(annotations), cfg["seed"])
        n = sum(p.numel() for p in model.parameters())
        log.info("tiny CLIP: %.2f M parameters, vocab %d", n / 1e6, len(tokenizer))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
