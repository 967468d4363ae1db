"""Questioner loop at real size: questions/s, the original's way vs ours, in one run.

Model: LLaVA-OneVision with Qwen2-7B + SigLIP-so400m-384 shapes, random bf16 weights.
Prompt: the product's prompt (llava_reid.questioner.prompts) with 4 candidate images of a
128x384 pedestrian crop (70 visual tokens each). Like the evaluation's lockstep engine, each
batch holds dialogues at the same round: rounds 0..4 (0..4 earlier questions), texts of varied
length.
Every question is exactly ``--new-tokens`` tokens long in both paths (end-of-turn suppressed),
so both do the same decoding work.

(i)  the original's way: mini-batches of 4 dialogues; every call runs the vision tower and
     projector on its 16 images; full prompt prefill per call (no KV reuse); HF ``generate``.
(ii) ours (the product's code path, llava_reid.questioner.generate): visual tokens cached once
     per gallery image (timed separately, amortised over the gallery), all dialogues of a round
     batched, the shared prompt prefix's KV computed once, length-sorted prefill into a
     fixed-slot KV cache, lockstep decoding replayed as one CUDA graph per step; timed with
     eager element-wise ops and with the product's fused RMSNorm/SiLU (questioner.fused).

The roofline of each path is computed from the measured bf16 matmul peak and copy bandwidth:
prefill (and vision) FLOPs at peak, plus per decode step max(FLOPs / peak, (weights + KV) bytes
/ bandwidth).

    cd bench && PYTHONPATH=../src python3 questioner_loop.py --dialogues 256
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

# Dialogue texts of varied length (as real ones are), combined per dialogue.
INITIALS = [
    "I saw a man in a dark jacket and jeans.",
    "I saw a woman with long hair in a white blouse and a black skirt near the entrance.",
    "A young man wearing a grey hoodie, blue jeans and white sneakers, carrying a backpack.",
    "I saw a woman in a red coat walking near the entrance with a brown handbag on her arm.",
]
QA = [("Was he carrying a bag?", "Yes, he carried a black backpack."),
      ("What colour were his shoes?", "His shoes were white."),
      ("Did she wear a hat?", "No, she did not wear a hat."),
      ("What kind of top was he wearing?", "He wore a blue jacket over a striped shirt."),
      ("How long was her hair?", "Her hair was long and tied back."),
      ("Was the person wearing glasses?", "I don't know."),
      ("What was the colour of the trousers?", "They were light grey trousers, quite loose."),
      ("Did he hold anything in his hands?", "He held a phone in his right hand.")]


def workload(n: int, round_: int, gallery: int):
    """``n`` dialogues at round ``round_`` (that many earlier questions each), as the
    evaluation's lockstep engine batches them: every prompt of a batch is at the same round."""
    prompts, image_ids = [], []
    for i in range(n):
        history = [QA[(3 * i + k) % len(QA)] for k in range(round_)]
        prompts.append(build_prompt(i % NUM_TEMPLATES, 4, INITIALS[i % len(INITIALS)],
                                    [q for q, _ in history], [a for _, a in history]))
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


def profile(run_ours) -> None:
    """The top CUDA kernels of path (ii)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_ours()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                    max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogues", type=int, default=256, help="dialogues per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--original-dialogues", type=int, default=12,
                    help="dialogues per round for path (i)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--gallery", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--profile", action="store_true", help="also profile path (ii)")
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

    rounds = [workload(args.dialogues, r, args.gallery) for r in range(args.rounds)]
    n_ours = args.dialogues * args.rounds
    lengths = [[len(q.prefix_ids(p)) + len(q.prompt_ids(p, [tokens_per_image] * 4))
                for p in prompts] for prompts, _ in rounds]
    prefix_len = len(q.prefix_ids(rounds[0][0][0]))
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=True, top_p=0.5)
    prefill_only = GenerationConfig(max_new_tokens=1, min_new_tokens=1, do_sample=True,
                                    top_p=0.5)
    seeds = list(range(args.dialogues))
    prefix = PrefixCache(q)

    def ours(gen_cfg=cfg):
        for prompts, image_ids in rounds:  # one lockstep batch per round, as the engine does
            generate_questions(q, prompts, image_ids, lambda ids: [cache[i] for i in ids],
                               seeds, gen_cfg, prefix, args.batch)

    def time_ours(label: str) -> dict:
        ours()  # warm-up (kernels, allocator, prefix KV, compiled kernels)
        seconds = wall_time(ours)
        prefill_s = wall_time(lambda: ours(prefill_only))
        decode_ms = (seconds - prefill_s) / (args.new_tokens - 1) / args.rounds * 1000
        return {"path": label, "questions": n_ours, "batch": args.batch, "seconds": seconds,
                "questions_per_s": n_ours / seconds, "prefill_s": prefill_s,
                "decode_ms_per_step": decode_ms}

    # (i) on a few dialogues per round, with the plain (unfused) model, as the original ran.
    n_orig = args.original_dialogues
    original_way(q, rounds[0][0][:4], rounds[0][1][:4], pixels, sizes, args.new_tokens)

    def original():
        for prompts, image_ids in rounds:
            original_way(q, prompts[:n_orig], image_ids[:n_orig], pixels, sizes,
                         args.new_tokens)

    orig_s = wall_time(original)

    plain = time_ours("(ii) ours, eager element-wise")
    q.fuse_language_model()
    fused = time_ours("(ii) ours (product: fused RMSNorm/SiLU)")
    if args.profile:
        profile(ours)

    roof_ours = sum(roofline_seconds(args.dialogues, lens, args.new_tokens, args.batch, params,
                                     peaks, shared_prefix=prefix_len) for lens in lengths)
    roof_prefill = sum(2 * params * (sum(lens) - prefix_len * len(lens))
                       for lens in lengths) / (peaks["bf16_matmul_tflops"] * 1e12)
    vision = vision_flops_per_image(q) * 16 * math.ceil(n_orig / 4)
    roof_orig = sum(roofline_seconds(n_orig, lens[:n_orig], args.new_tokens, 4, params, peaks,
                                     vision_flops=vision) for lens in lengths)
    n_orig_total = n_orig * args.rounds
    rows = [{"path": "(i) original way", "questions": n_orig_total, "batch": 4,
             "seconds": orig_s, "questions_per_s": n_orig_total / orig_s,
             "roofline_qps": n_orig_total / roof_orig, "of_roofline": roof_orig / orig_s}]
    for r in (plain, fused):
        r.update(roofline_qps=n_ours / roof_ours, of_roofline=roof_ours / r["seconds"],
                 prefill_of_roofline=roof_prefill / r["prefill_s"])
        rows.append(r)
    best_qps = max(plain["questions_per_s"], fused["questions_per_s"])
    orig_qps = n_orig_total / orig_s
    all_lengths = [x for lens in lengths for x in lens]
    result = {
        "gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "peaks": peaks,
        "lm_params": params, "rounds": args.rounds,
        "prompt_tokens_mean": sum(all_lengths) / len(all_lengths),
        "prompt_tokens_mean_per_round": [sum(x) / len(x) for x in lengths],
        "shared_prefix_tokens": prefix_len, "visual_tokens_per_image": tokens_per_image,
        "new_tokens": args.new_tokens, "roofline_s": roof_ours,
        "roofline_prefill_s": roof_prefill, "paths": rows,
        "speedup_ii_over_i": fused["questions_per_s"] / orig_qps,
        "visual_cache": {"images": args.gallery, "seconds": cache_s,
                         "images_per_s": args.gallery / cache_s},
    }
    write_results("questioner_loop", result)
    print(f"{gpu_name()}: matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s, copy "
          f"{peaks['copy_gbps']:.0f} GB/s; prompt {result['prompt_tokens_mean']:.0f} tokens "
          f"(shared prefix {prefix_len}), {tokens_per_image} visual tokens/image; "
          f"roofline {roof_ours:.2f}s (prefill {roof_prefill:.2f}s)")
    print_table("questioner loop", rows, ["path", "questions", "batch", "seconds",
                                          "questions_per_s", "roofline_qps", "of_roofline",
                                          "prefill_s", "prefill_of_roofline",
                                          "decode_ms_per_step"])
    print(f"speed-up (ii, product)/(i): {result['speedup_ii_over_i']:.1f}x "
          f"(best (ii) {best_qps / orig_qps:.1f}x); visual cache "
          f"{args.gallery / cache_s:.0f} images/s")


if __name__ == "__main__":
    main()
