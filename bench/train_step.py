"""One training step at real size: samples/s and peak GPU memory.

(a) questioner LoRA SFT: LLaVA-OneVision Qwen2-7B + SigLIP-so400m shapes, bf16 weights, LoRA
    r=128 on every decoder linear layer, gradient checkpointing, the product's
    ``Questioner.training_batch`` / ``loss`` (4 cached candidate images, the real prompt);
(b) retriever: CLIP ViT-B/16 at 384x128 with a 192-token context, SDM + ID + MLM, the product's
    ``retriever.train.train_step`` under accelerate's bf16 autocast.

    PYTHONPATH=src python3 bench/train_step.py
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
    print_table,
    real_size_questioner,
    write_results,
)

from llava_reid.questioner.loading import attach_lora
from llava_reid.questioner.prompts import build_prompt


def questioner_step(dev, batch: int) -> dict:
    tok = bench_tokenizer()
    q = real_size_questioner(dev, tok)
    qcfg = {"lora": {"rank": 128, "alpha": 256, "dropout": 0.05,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"], "modules_to_save": []},
            "train_projector": False, "sft": {"gradient_checkpointing": True}}
    attach_lora(q, qcfg)
    q.net.train()
    params = [p for p in q.net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    d = q.base.config.text_config.hidden_size
    images = [[torch.randn(70, d, device=dev, dtype=torch.bfloat16) for _ in range(4)]
              for _ in range(batch)]
    prompts = [build_prompt(i % 3, 4, "I saw a man in a dark jacket and jeans.",
                            ["Was he carrying a bag?"] * (i % 5),
                            ["Yes, he carried a black backpack."] * (i % 5))
               for i in range(batch)]
    targets = ["What colour were his shoes?"] * batch
    ids = [list(range(4))] * batch

    def step():
        b = q.training_batch(prompts, ids, images, targets)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = q.loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t = cuda_time(step, warmup=2, iters=5)
    seq = q.training_batch(prompts[:1], ids[:1], images[:1], targets[:1]).input_ids.shape[1]
    return {"model": "questioner 7B LoRA r128 + grad ckpt", "batch": batch, "seq_len": seq,
            "samples_per_s": batch / t, "step_s": t,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "trainable_m": sum(p.numel() for p in params) / 1e6}


def retriever_step(dev, batch: int) -> dict:
    from accelerate import Accelerator
    from transformers import CLIPConfig, CLIPModel

    from llava_reid.retriever.model import Retriever
    from llava_reid.retriever.train import train_step

    config = CLIPConfig(text_config=CLIP_B16_TEXT, vision_config=CLIP_B16_VISION,
                        projection_dim=512)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Retriever(CLIPModel(config), num_classes=11000, mlm_layers=4).to(dev)
    acc = Accelerator(mixed_precision="bf16")
    model, opt = acc.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-5))
    pixels = torch.randn(batch, 3, 384, 128)
    ids = torch.randint(1, 49000, (batch, 192))
    mask = torch.ones_like(ids)
    mask[:, 120:] = 0

    def tokenize(texts):
        return ids, mask

    batch_data = (pixels, ["x"] * batch, torch.randint(0, 11000, (batch,)),
                  torch.randint(0, 4000, (batch,)))
    mask_cfg = {"mask_id": 49408, "vocab_size": 49409, "special_ids": [0, 49406, 49407],
                "prob": 0.15}
    weights = {"sdm": 1.0, "id": 1.0, "mlm": 1.0}
    g = torch.Generator().manual_seed(0)

    def step():
        with acc.autocast():
            loss, _ = train_step(model, batch_data, tokenize, mask_cfg, weights, 0.02, acc, g)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t = cuda_time(step, warmup=2, iters=5)
    return {"model": "retriever CLIP-B/16 SDM+ID+MLM", "batch": batch, "seq_len": 192,
            "samples_per_s": batch / t, "step_s": t,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "trainable_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questioner-batch", type=int, default=4)
    ap.add_argument("--retriever-batch", type=int, default=128)
    args = ap.parse_args()
    dev = device()
    rows = [retriever_step(dev, args.retriever_batch)]
    torch.cuda.empty_cache()
    rows.append(questioner_step(dev, args.questioner_batch))
    write_results("train_step", {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"),
                                 "rows": rows})
    print_table(f"training step on {gpu_name()}", rows,
                ["model", "batch", "seq_len", "samples_per_s", "step_s", "peak_mem_gib",
                 "trainable_m"])


if __name__ == "__main__":
    main()
