"""Questioner loop at real size: questions/s, the original's way vs ours, in one run.

Model: LLaVA-OneVision with Qwen2-7B + SigLIP-so400m-384 shapes, random bf16 weights.
Prompt: the product's prompt (llava_reid.questioner.prompts) with 4 candidate images of a
128x384 pedestrian crop (70 visual tokens each) and dialogue histories of 0-4 rounds.
Every question is exactly ``--new-tokens`` tokens long in both paths (end-of-turn suppressed),
so both do the same decoding work.

(i)  the original's way: mini-batches of 4 dialogues; every call runs the vision tower and
     projector on its 16 images; full prompt prefill per call (no KV reuse); HF ``generate``.
(ii) ours (the product's code path, llava_reid.questioner.generate): visual tokens cached once
     per gallery image (timed separately, amortised over the gallery), all dialogues batched,
     the shared prompt prefix's KV computed once, lockstep decoding.

The roofline of each path is computed from the measured bf16 matmul peak and copy bandwidth:
prefill (and vision) FLOPs at peak, plus per decode step max(FLOPs / peak, (weights + KV) bytes
/ bandwidth).

    PYTHONPATH=src python3 bench/questioner_loop.py --dialogues 256 --original-dialogues 64
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import (
    QWEN2_7B,
    bench_tokenizer,
    device,
    gpu_name,
    lm_params,
    measured_peaks,
    print_table,
    real_size_questioner,
    wall_time,
    write_results,
)
from PIL import Image

from llava_reid.questioner.generate import GenerationConfig, PrefixCache, generate_questions
from llava_reid.questioner.model import splice_images
from llava_reid.questioner.prompts import NUM_TEMPLATES, build_prompt
from llava_reid.questioner.vision import visual_tokens

QUESTIONS = ["Was he carrying a bag?", "What colour were his shoes?", "Did she wear a hat?",
             "What kind of top was he wearing?"]
ANSWERS = ["Yes, he carried a black backpack.", "His shoes were white.",
           "No, she did not wear a hat.", "He wore a blue jacket on top."]
INITIAL = "I saw a man in a dark jacket and jeans walking near the entrance."


def workload(n: int, gallery: int):
    prompts, image_ids = [], []
    for i in range(n):
        r = i % 5
        prompts.append(build_prompt(i % NUM_TEMPLATES, 4, INITIAL, QUESTIONS[:r][:4],
                                    ANSWERS[:r][:4]))
        image_ids.append([(4 * i + k) % gallery for k in range(4)])
    return prompts, image_ids


def kv_bytes_per_token() -> int:
    head_dim = QWEN2_7B["hidden_size"] // QWEN2_7B["num_attention_heads"]
    return 2 * QWEN2_7B["num_hidden_layers"] * QWEN2_7B["num_key_value_heads"] * head_dim * 2


def roofline_seconds(n_questions: int, prompt_tokens: list[int], new_tokens: int, batch: int,
                     params: int, peaks: dict, vision_flops: float = 0.0,
                     shared_prefix: int = 0) -> float:
    """Lower bound on the time of generating for ``n_questions`` prompts in batches."""
    peak = peaks["bf16_matmul_tflops"] * 1e12
    bw = peaks["copy_gbps"] * 1e9
    weight_bytes = 2 * params
    total = vision_flops / peak
    for s in range(0, n_questions, batch):
        lens = prompt_tokens[s : s + batch]
        computed = sum(length - shared_prefix for length in lens)
        total += 2 * params * computed / peak
        for step in range(new_tokens):
            flops = 2 * params * len(lens)
            kv = kv_bytes_per_token() * sum(length + step for length in lens)
            total += max(flops / peak, (weight_bytes + kv) / bw)
    return total


def vision_flops_per_image(q) -> float:
    v = q.base.config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2
    per_layer = 2 * tokens * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    per_layer += 4 * tokens**2 * v.hidden_size
    d = q.base.config.text_config.hidden_size
    projector = 2 * tokens * (v.hidden_size * d + d * d)
    return v.num_hidden_layers * per_layer + projector


def original_way(q, prompts, image_ids, pixels, sizes, new_tokens: int) -> list[str]:
    """Mini-batches of 4; vision tower on every call; no KV reuse; HF generate."""
    out = []
    for s in range(0, len(prompts), 4):
        batch_prompts, batch_ids = prompts[s : s + 4], image_ids[s : s + 4]
        flat = [i for ids in batch_ids for i in ids]
        with torch.no_grad():
            toks = visual_tokens(q.base, pixels[flat], [sizes[i] for i in flat], q.pool_ratio)
        per_row = [toks[4 * k : 4 * k + 4] for k in range(len(batch_prompts))]
        rows = [q.prefix_ids(p) + q.prompt_ids(p, [len(t) for t in tt])
                for p, tt in zip(batch_prompts, per_row, strict=True)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), q.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(rows):  # left padding, as the original
            ids[k, width - len(r):] = torch.tensor(r)
            mask[k, width - len(r):] = 1
        ids, mask = ids.to(q.device), mask.to(q.device)
        with torch.no_grad():
            embeds = splice_images(q.embed(ids), ids, q.image_token_id, per_row)
            gen = q.base.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=True,
                                  top_p=0.5, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=q.pad_id)
        out += q.tokenizer.batch_decode(gen, skip_special_tokens=True)
    return out


def profile(ours, q, prompts, image_ids, cache, seeds, prefix, args) -> None:
    """Where path (ii)'s time goes: prefill-only vs full, and the top CUDA kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    one = GenerationConfig(max_new_tokens=1, min_new_tokens=1, do_sample=True, top_p=0.5)
    prefill_s = wall_time(lambda: generate_questions(
        q, prompts, image_ids, lambda ids: [cache[i] for i in ids], seeds, one, prefix,
        args.batch))
    full_s = wall_time(ours)
    print(f"prefill+1 token {prefill_s:.2f}s, full {full_s:.2f}s "
          f"-> decode {(full_s - prefill_s) / (args.new_tokens - 1) * 1000:.1f} ms/step")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ours()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogues", type=int, default=256)
    ap.add_argument("--original-dialogues", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--gallery", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--profile", action="store_true", help="profile path (ii) and exit")
    ap.add_argument("--compile", action="store_true",
                    help="also time path (ii) after Questioner.compile_for_inference()")
    args = ap.parse_args()
    dev = device()
    peaks = measured_peaks(dev)
    tok = bench_tokenizer()
    q = real_size_questioner(dev, tok)
    params = lm_params(q)

    # A gallery of pedestrian crops (random pixels; 128x384 like CUHK-PEDES after resizing).
    g = torch.Generator().manual_seed(0)
    crops = [Image.fromarray(torch.randint(0, 255, (384, 128, 3), generator=g,
                                           dtype=torch.uint8).numpy()) for _ in range(64)]
    images = [crops[i % 64] for i in range(args.gallery)]
    pixels, sizes = q.preprocess.batch(images)
    pixels = pixels.to(dev, torch.bfloat16)

    # (ii) step 1: the visual-token cache, once per gallery image.
    cache: dict[int, torch.Tensor] = {}

    def build_cache():
        for s in range(0, args.gallery, 64):
            with torch.no_grad():
                toks = visual_tokens(q.base, pixels[s : s + 64], sizes[s : s + 64],
                                     q.pool_ratio)
            for k, t in enumerate(toks):
                cache[s + k] = t

    cache_s = wall_time(build_cache)
    tokens_per_image = int(cache[0].shape[0])

    prompts, image_ids = workload(args.dialogues, args.gallery)
    lengths = [len(q.prefix_ids(p)) + len(q.prompt_ids(p, [tokens_per_image] * 4))
               for p in prompts]
    prefix_len = len(q.prefix_ids(prompts[0]))
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=True, top_p=0.5)
    seeds = list(range(args.dialogues))
    prefix = PrefixCache(q)

    def ours():
        return generate_questions(q, prompts, image_ids, lambda ids: [cache[i] for i in ids],
                                  seeds, cfg, prefix, args.batch)

    ours()  # warm-up (kernels, allocator, prefix KV)
    ours_s = wall_time(ours)
    if args.profile:
        profile(ours, q, prompts, image_ids, cache, seeds, prefix, args)
        return

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        ours()
        efficient_s = wall_time(ours)

    compiled_s = None
    if args.compile:  # regional compile of the decoder layers (not used by the product)
        for layer in q.base.model.language_model.layers:
            layer.compile(dynamic=True)
        ours()  # compiles
        ours()
        compiled_s = wall_time(ours)

    n_orig = args.original_dialogues
    original_way(q, prompts[:4], image_ids[:4], pixels, sizes, args.new_tokens)  # warm-up
    orig_s = wall_time(lambda: original_way(q, prompts[:n_orig], image_ids[:n_orig], pixels,
                                            sizes, args.new_tokens))

    vision_per_image = vision_flops_per_image(q)
    roof_ours = roofline_seconds(args.dialogues, lengths, args.new_tokens, args.batch, params,
                                 peaks, shared_prefix=prefix_len)
    roof_orig = roofline_seconds(n_orig, lengths[:n_orig], args.new_tokens, 4, params, peaks,
                                 vision_flops=16 * vision_per_image * math.ceil(n_orig / 4))
    ours_qps, orig_qps = args.dialogues / ours_s, n_orig / orig_s
    extra = [{"path": "(ii) ours, SDPA efficient/flash only", "questions": args.dialogues,
              "batch": args.batch, "seconds": efficient_s,
              "questions_per_s": args.dialogues / efficient_s,
              "roofline_qps": args.dialogues / roof_ours, "of_roofline": roof_ours / efficient_s}]
    if compiled_s is not None:
        extra.append({"path": "(ii) ours, compiled", "questions": args.dialogues,
                      "batch": args.batch, "seconds": compiled_s,
                      "questions_per_s": args.dialogues / compiled_s,
                      "roofline_qps": args.dialogues / roof_ours,
                      "of_roofline": roof_ours / compiled_s})
    rows = [
        {"path": "(i) original way", "questions": n_orig, "batch": 4, "seconds": orig_s,
         "questions_per_s": orig_qps, "roofline_qps": n_orig / roof_orig,
         "of_roofline": roof_orig / orig_s},
        {"path": "(ii) ours", "questions": args.dialogues, "batch": args.batch,
         "seconds": ours_s, "questions_per_s": args.dialogues / ours_s,
         "roofline_qps": args.dialogues / roof_ours, "of_roofline": roof_ours / ours_s},
        *extra,
    ]
    if compiled_s is not None:
        ours_qps = max(ours_qps, args.dialogues / compiled_s)
    result = {
        "gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "peaks": peaks,
        "lm_params": params, "prompt_tokens_mean": sum(lengths) / len(lengths),
        "shared_prefix_tokens": prefix_len, "visual_tokens_per_image": tokens_per_image,
        "new_tokens": args.new_tokens, "paths": rows, "speedup_ii_over_i": ours_qps / orig_qps,
        "visual_cache": {"images": args.gallery, "seconds": cache_s,
                         "images_per_s": args.gallery / cache_s},
    }
    write_results("questioner_loop", result)
    print(f"{gpu_name()}: matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s, copy "
          f"{peaks['copy_gbps']:.0f} GB/s; prompt {result['prompt_tokens_mean']:.0f} tokens "
          f"(shared prefix {prefix_len}), {tokens_per_image} visual tokens/image")
    print_table("questioner loop", rows, ["path", "questions", "batch", "seconds",
                                          "questions_per_s", "roofline_qps", "of_roofline"])
    print(f"speed-up (ii)/(i): {ours_qps / orig_qps:.1f}x; visual cache "
          f"{args.gallery / cache_s:.0f} images/s")


if __name__ == "__main__":
    main()
