"""``import-retriever``: published retriever weights -> this workflow's retriever folder.

- ``irra``: IRRA's (or the original LLaVA-ReID's) checkpoint, converted exactly (see
  ``irra_layout``), with a local CLIP tokenizer, keeping the checkpoint's text context and input
  size. The ID head goes to ``heads.safetensors`` under our name (``classifier.*``); IRRA's MLM
  cross-former is built differently from ours (pre-norm QuickGELU blocks) and is not carried.
- ``ours``: a ``retriever/model`` folder of an earlier run, loaded once to validate, then copied.

With ``--annotations`` the imported model is evaluated on the val and test splits, the
figures ``train-retriever`` reports for the model it keeps.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer

from llava_reid.artifacts import atomic_dir, write_json
from llava_reid.retriever.encoder import SETTINGS_FILE, RetrieverEncoder, write_settings
from llava_reid.retriever.init import MASK_TOKEN
from llava_reid.retriever.irra_layout import build_clip, read_state_dict, split_irra

log = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
IRRA_INPUT = (384, 128)  # IRRA's and the original's training input (height, width)


def _tokenizer(folder: str, source: str):
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no tokenizer folder (the CLIP tokenizer {source} "
                                "was trained with, in Hugging Face format)")
    return AutoTokenizer.from_pretrained(str(path))


def _add_mask_token(model, tokenizer) -> None:
    """Our MLM needs a mask token. Its new row starts from IRRA's mask embedding when the
    vocabulary ends as IRRA's does (mask, start, end: IRRA gives up the last BPE merge for
    its mask), else from the mean row."""
    if tokenizer.mask_token is not None:
        return
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    emb = model.text_model.embeddings.token_embedding
    rows = emb.weight.shape[0]
    if len(tokenizer) > rows:
        grown = nn.Embedding(len(tokenizer), emb.weight.shape[1])
        grown.weight.data[:rows] = emb.weight.data
        irra_layout = (tokenizer.bos_token_id, tokenizer.eos_token_id) == (rows - 2, rows - 1)
        start = emb.weight.data[rows - 3] if irra_layout else emb.weight.data.mean(0)
        grown.weight.data[rows:] = start
        model.text_model.embeddings.token_embedding = grown
        model.config.text_config.vocab_size = len(tokenizer)


def convert_irra(path: str, tokenizer_dir: str, out: str, image_size: tuple[int, int],
                 temperature: float) -> dict[str, Any]:
    """Write our retriever folder from IRRA's checkpoint; returns what was carried."""
    state = read_state_dict(path)
    clip_sd, id_head, mlm = split_irra(state, path)
    tokenizer = _tokenizer(tokenizer_dir, path)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"{tokenizer_dir}: tokenizer needs bos_token and eos_token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = clip_sd["token_embedding.weight"].shape[0] if "token_embedding.weight" in clip_sd else 0
    if len(tokenizer) > vocab:
        raise ValueError(f"{tokenizer_dir}: {len(tokenizer)} tokens, but {path} embeds {vocab}: "
                         "not the tokenizer it was trained with")
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    model = build_clip(clip_sd, image_size, path, special)
    _add_mask_token(model, tokenizer)
    context = model.config.text_config.max_position_embeddings
    tokenizer.model_max_length = context
    settings = {"image_height": image_size[0], "image_width": image_size[1],
                "text_length": context, "temperature": temperature, "image_pooling": "cls"}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_settings(tmp, settings)
        if id_head:
            save_file({k: v.float().contiguous() for k, v in id_head.items()},
                      str(tmp / HEADS_FILE), metadata={"source": str(path)})
    carried = {"id_head": sorted(id_head), "not_carried": sorted({k.split(".")[0] for k in mlm})}
    log.info("imported %s: input %dx%d, text context %d, ID head %s, not carried %s", path,
             *image_size, context, "yes" if id_head else "no", carried["not_carried"] or "-")
    return {"settings": settings, **carried}


def copy_ours(path: str, out: str) -> dict[str, Any]:
    """Validate an earlier run's retriever folder by loading it, then copy it."""
    folder = Path(path)
    if not (folder / SETTINGS_FILE).exists():
        raise FileNotFoundError(f"{folder}: not a retriever folder (no {SETTINGS_FILE})")
    RetrieverEncoder.from_pretrained(folder, "cpu")
    with atomic_dir(out) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    return {"settings": json.loads((folder / SETTINGS_FILE).read_text())}


def run(cfg: dict[str, Any], source: str, path: str, out: str, tokenizer: str | None = None,
        metrics: str | None = None, annotations: str | None = None,
        image_root: str | None = None) -> None:
    rcfg = cfg.get("retriever", {})
    if source == "irra":
        tokenizer = (tokenizer or (rcfg.get("checkpoint") or {}).get("tokenizer")
                     or rcfg.get("pretrained"))
        if not tokenizer:
            raise ValueError("import-retriever --from irra needs the CLIP tokenizer: --tokenizer, "
                             "retriever.checkpoint.tokenizer or retriever.pretrained")
        size = (rcfg.get("image_height", IRRA_INPUT[0]), rcfg.get("image_width", IRRA_INPUT[1]))
        result = convert_irra(path, tokenizer, out, size, rcfg.get("temperature", 0.02))
    elif source == "ours":
        result = copy_ours(path, out)
    else:
        raise ValueError(f"import-retriever: unknown format {source!r} (irra or ours)")
    result = {"imported": {"format": source, "path": str(path)}, **result}
    if annotations:
        result.update(evaluate_imported(out, annotations, image_root,
                                        rcfg.get("eval_batch_size", 256), cfg.get("device", "auto")))
    if metrics:
        write_json(result, metrics)


def evaluate_imported(folder: str, annotations: str, image_root: str | None, batch_size: int,
                      device: str) -> dict[str, Any]:
    """val and test metrics of an imported retriever (as train-retriever reports them)."""
    from llava_reid.data.annotations import read_annotations
    from llava_reid.retriever.train import evaluate_split

    if image_root is None:
        raise ValueError("import-retriever: --annotations needs --image-root")
    encoder = RetrieverEncoder.from_pretrained(folder, device)
    table = read_annotations(annotations)
    out = {}
    with torch.inference_mode():
        for split in ("val", "test"):
            rows = table[table.split == split]
            if len(rows):
                out[split] = evaluate_split(encoder, rows, Path(image_root), batch_size)
    log.info("imported retriever: test %s", out.get("test"))
    return out
