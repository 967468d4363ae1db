"""Gallery encoding at real size: images/s and achieved TFLOP/s beside the measured peak.

(a) the retriever's image encoder: CLIP ViT-B/16 at 384x128 (192 patches + CLS), the
    product's ``Retriever.encode_image``;
(b) the questioner's visual-token caching: SigLIP-so400m-384 + projector + 2x2 pooling +
    unpadding + newlines, the product's ``llava_reid.questioner.vision.visual_tokens``.

Both in bf16 with SDPA attention, eager and with ``torch.compile`` of the encoder.

    PYTHONPATH=src python3 bench/gallery_encoding.py
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    CLIP_B16_TEXT,
    CLIP_B16_VISION,
    bench_tokenizer,
    cuda_time,
    device,
    gpu_name,
    measured_peaks,
    print_table,
    real_size_questioner,
    write_results,
)
from transformers import CLIPConfig, CLIPModel

from llava_reid.questioner.vision import visual_tokens
from llava_reid.retriever.model import Retriever


def vit_flops(tokens: int, hidden: int, ffn: int, layers: int) -> float:
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * tokens**2 * hidden
    return layers * per_layer


def retriever_rows(dev, peak, batches, compile_: bool):
    config = CLIPConfig(text_config=CLIP_B16_TEXT, vision_config=CLIP_B16_VISION,
                        projection_dim=512)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    clip = CLIPModel(config).to(dev, torch.bfloat16).eval()
    model = Retriever(clip, num_classes=0, with_mlm=False)
    encode = torch.compile(model.encode_image) if compile_ else model.encode_image
    tokens = (384 // 16) * (128 // 16) + 1
    flops = vit_flops(tokens, 768, 3072, 12) + 2 * 768 * 512
    rows = []
    for b in batches:
        x = torch.randn(b, 3, 384, 128, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            t = cuda_time(lambda x=x: encode(x), warmup=3, iters=10)
        rows.append({"encoder": "retriever CLIP-B/16 384x128", "compiled": compile_, "batch": b,
                     "images_per_s": b / t, "tflops": b * flops / t / 1e12,
                     "of_peak": b * flops / t / 1e12 / peak})
    return rows


def questioner_rows(dev, peak, batches, compile_: bool, q):
    v = q.base.config.vision_config
    d = q.base.config.text_config.hidden_size
    tokens = (v.image_size // v.patch_size) ** 2
    flops = vit_flops(tokens, v.hidden_size, v.intermediate_size, v.num_hidden_layers)
    flops += 2 * tokens * (v.hidden_size * d + d * d)
    sizes_one = (384, 128)
    tower = q.base.model.vision_tower
    if compile_:  # what Questioner.compile_vision_tower does in cache-visual-tokens
        q.base.model.vision_tower = torch.compile(tower)
    rows = []
    try:
        for b in batches:
            x = torch.randn(b, 3, v.image_size, v.image_size, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                t = cuda_time(lambda x=x, b=b: visual_tokens(q.base, x, [sizes_one] * b,
                                                             q.pool_ratio), warmup=3, iters=8)
            rows.append({"encoder": "questioner SigLIP-so400m+projector", "compiled": compile_,
                         "batch": b, "images_per_s": b / t, "tflops": b * flops / t / 1e12,
                         "of_peak": b * flops / t / 1e12 / peak})
    finally:
        q.base.model.vision_tower = tower
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev = device()
    peaks = measured_peaks(dev)
    peak = peaks["bf16_matmul_tflops"]
    modes = [False] if args.no_compile else [False, True]
    rows = []
    for c in modes:
        rows += retriever_rows(dev, peak, [128, 512, 1024], c)
    q = real_size_questioner(dev, bench_tokenizer(2000))
    for c in modes:
        rows += questioner_rows(dev, peak, [32, 64, 128], c, q)
    write_results("gallery_encoding", {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"),
                                       "peaks": peaks, "rows": rows})
    print(f"{gpu_name()}: measured bf16 matmul peak {peak:.0f} TFLOP/s")
    print_table("gallery encoding", rows,
                ["encoder", "compiled", "batch", "images_per_s", "tflops", "of_peak"])


if __name__ == "__main__":
    main()
