"""Real-size smoke run: a Qwen2-7B + SigLIP-so400m LLaVA-OneVision (random weights) goes
through the product's loading path (``save_pretrained`` -> ``Questioner.from_pretrained``),
caches the visual tokens of 4 images, runs one training forward and one generate; records
times and peak GPU memory.

    PYTHONPATH=src python3 bench/real_size_smoke.py --folder /tmp/llava-ov-7b-random
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import bench_tokenizer, device, gpu_name, real_size_questioner, write_results
from PIL import Image

import llava_reid.questioner.generate as gen
from llava_reid.questioner.generate import GenerationConfig, choose_tokens, generate_questions
from llava_reid.questioner.model import Questioner
from llava_reid.questioner.prompts import build_prompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/llava-ov-7b-random")
    args = ap.parse_args()
    dev = device()
    folder = Path(args.folder)
    tok = bench_tokenizer()
    timings = {}
    t = time.perf_counter()
    built = real_size_questioner(dev, tok)
    built.base.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del built
    torch.cuda.empty_cache()
    timings["build_and_save_s"] = time.perf_counter() - t

    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    qcfg = {"pool_ratio": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    q = Questioner.from_pretrained(folder, qcfg, dev)
    torch.cuda.synchronize()
    timings["from_pretrained_s"] = time.perf_counter() - t

    crops = [Image.new("RGB", (128, 384), (40 * i, 90, 160)) for i in range(4)]
    t = time.perf_counter()
    tokens = q.encode_images(crops)
    torch.cuda.synchronize()
    timings["visual_tokens_s"] = time.perf_counter() - t
    prompt = build_prompt(0, 4, "I saw a man in a dark jacket.", ["Was he carrying a bag?"],
                          ["Yes, he carried a black backpack."])
    batch = q.training_batch([prompt], [[0, 1, 2, 3]], [tokens], ["What colour were his shoes?"])
    t = time.perf_counter()
    with torch.no_grad():
        loss = float(q.loss(batch))
    torch.cuda.synchronize()
    timings["forward_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out = generate_questions(q, [prompt], [[0, 1, 2, 3]], lambda ids: [tokens[i] for i in ids],
                             [0], GenerationConfig(max_new_tokens=24, min_new_tokens=24))
    torch.cuda.synchronize()
    timings["generate_24_tokens_s"] = time.perf_counter() - t

    # Decode replayed as a CUDA graph must pick exactly the tokens eager decode picks (same
    # kernels); the fused element-wise ops may move bf16 near-ties, so their agreement is
    # reported, not asserted.
    rounds = [build_prompt(i % 3, 4, "I saw a man in a dark jacket.", ["Was he carrying a bag?",
                           "What colour were his shoes?"][: i % 3],
                           ["Yes, he carried a black backpack.", "White."][: i % 3])
              for i in range(6)]

    def questions(graphs: bool) -> list[list[int]]:
        """The token ids picked at every step (random weights decode to unreadable text)."""
        picked = []

        def recording(*args):
            token = choose_tokens(*args)
            picked.append(token.tolist())
            return token

        gen.choose_tokens = recording
        try:
            generate_questions(q, rounds, [[0, 1, 2, 3]] * 6,
                               lambda ids: [tokens[i] for i in ids], list(range(6)),
                               GenerationConfig(max_new_tokens=16, min_new_tokens=16,
                                                do_sample=False, cuda_graphs=graphs))
        finally:
            gen.choose_tokens = choose_tokens
        return [list(row) for row in zip(*picked, strict=True)]

    def last_hidden() -> torch.Tensor:
        with torch.no_grad():
            embeds = q.inputs_embeds(batch).to(next(q.base.parameters()).dtype)
            return q.base.model.language_model(
                inputs_embeds=embeds, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False).last_hidden_state.float()

    plain_hidden = last_hidden()
    eager, graphed = questions(False), questions(True)
    if graphed != eager:
        raise SystemExit(f"CUDA-graph decode differs from eager decode:\n{eager}\n{graphed}")
    timings["graph_equals_eager_tokens"] = sum(map(len, eager))
    q.fuse_language_model()
    fused = questions(True)
    fused_hidden = last_hidden()
    q.base.float()  # fp32 reference (bf16 -> fp32 -> bf16 is exact for the weights)
    reference = last_hidden()
    q.base.to(torch.bfloat16)

    def rel(x: torch.Tensor) -> float:
        return float((x - reference).norm() / reference.norm())

    timings["hidden_rel_error_vs_fp32_eager"] = rel(plain_hidden)
    timings["hidden_rel_error_vs_fp32_fused"] = rel(fused_hidden)
    timings["fused_token_agreement"] = sum(
        a == b for x, y in zip(fused, eager, strict=True) for a, b in zip(x, y, strict=True)
    ) / sum(map(len, eager))
    result = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"),
              "params_b": sum(p.numel() for p in q.net.parameters()) / 1e9,
              "visual_tokens_per_image": [int(x.shape[0]) for x in tokens],
              "prompt_tokens": int(batch.input_ids.shape[1]), "loss": loss,
              "generated": out.questions[0][:80], "seen": out.seen[0],
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, **timings}
    write_results("real_size_smoke", result)
    for k, v in result.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
