"""Shared benchmark helpers: the real-size model shapes, device ceilings, timing, output.

The benchmarks run on a GPU machine whose Python has torch, transformers, accelerate, peft,
pandas and pyarrow; they import this repository's package from ``src/`` (no install needed).
Weights are random (speed does not depend on their values); every shape is the real one.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Qwen2-7B (LLaVA-OneVision-Qwen2-7B's language model) and SigLIP-so400m-patch14-384 as
# LLaVA-OneVision uses it (26 layers, no pooling head).
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                max_position_embeddings=32768, rope_theta=1_000_000.0)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                     num_attention_heads=16, image_size=384, patch_size=14,
                     vision_use_head=False)
# CLIP ViT-B/16 as the retriever uses it: 384x128 input, 192-token text context.
CLIP_B16_TEXT = dict(vocab_size=49409, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=192,
                     projection_dim=512)
CLIP_B16_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=384, patch_size=16, projection_dim=512)


def device() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit("these benchmarks need a CUDA GPU")
    return torch.device("cuda")


def gpu_name() -> str:
    return torch.cuda.get_device_name(0)


def cuda_time(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of ``fn`` over ``iters`` runs after ``warmup`` (device-synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def wall_time(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def measured_peaks(dev: torch.device) -> dict[str, float]:
    """bf16 matmul TFLOP/s (8192^3, random data) and device-to-device copy bandwidth (GB/s,
    bytes read + written), measured now on this GPU."""
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=3, iters=10)
    src = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    tc = cuda_time(lambda: dst.copy_(src), warmup=2, iters=10)
    return {"bf16_matmul_tflops": 2 * n**3 / t / 1e12,
            "copy_gbps": 2 * src.numel() * 2 / tc / 1e9}


def write_results(name: str, results: dict) -> Path:
    folder = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def bench_tokenizer(vocab_size: int = 8000):
    """A ChatML BPE tokenizer trained on the prompt text and synthetic descriptions (the
    random-weight model has no real tokenizer; prompt lengths are reported as measured)."""
    import numpy as np

    from llava_reid.data import attributes as A
    from llava_reid.questioner.factory import EXTRA_TOKENS, SPECIAL_TOKENS, prompt_corpus
    from llava_reid.tokenization import train_bpe_tokenizer

    rng = np.random.default_rng(0)
    corpus = []
    for _ in range(400):
        p = A.sample_person(rng)
        corpus.append(A.fine_grained_description(p, rng))
        for slot in A.SLOTS:
            corpus += list(A.question_answer(p, slot, rng)[1:])
    return train_bpe_tokenizer(corpus + prompt_corpus() * 20, vocab_size, SPECIAL_TOKENS,
                               EXTRA_TOKENS)


def real_size_questioner(dev: torch.device, tokenizer, attn: str = "sdpa"):
    """LLaVA-OneVision with Qwen2-7B + SigLIP-so400m shapes, random bf16 weights, on ``dev``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from llava_reid.questioner.model import Questioner

    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**QWEN2_7B, eos_token_id=tokenizer.convert_tokens_to_ids(
            "<|im_end|>"), pad_token_id=tokenizer.pad_token_id),
        vision_config=SiglipVisionConfig(**SIGLIP_SO400M),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(dev):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            net = LlavaOnevisionForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(prev)
    net.eval()
    qcfg = {"pool_ratio": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return Questioner(net, tokenizer, qcfg, dev)


def lm_params(q) -> int:
    lm = q.base.model.language_model
    return sum(p.numel() for p in lm.parameters()) + q.base.lm_head.weight.numel()
