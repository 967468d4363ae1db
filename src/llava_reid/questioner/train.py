"""train-questioner: LoRA SFT of the questioner on the look-ahead conversations.

- the base LLaVA-OneVision loads from its local folder (optionally 4-bit when bitsandbytes and
  a GPU are present); peft LoRA goes on the language model's linear layers named in the config
  (never on the vision tower); ``modules_to_save`` adds fully trained modules (the embedded
  default's random tiny model trains its embeddings and head too; the 7B model does not);
- the projector is frozen by default and the visual tokens come from the cached file; with
  ``train_projector: true`` the projector trains too and visual tokens are computed online
  from the images (vision tower frozen), and later caches are rebuilt from the trained weights;
- loss on the question and its end-of-turn token only;
- accelerate for bf16 on GPU, fp32 on CPU, DDP under torchrun, gradient accumulation;
- a checkpoint every ``checkpoint_every`` optimizer steps and at the end of each epoch; a rerun
  with the same config resumes from the last one;
- at the end: held-out loss, and greedy questions on held-out prompts scored for
  well-formedness (llava_reid.questioner.quality).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from llava_reid.artifacts import atomic_dir, write_json
from llava_reid.questioner.generate import GenerationConfig, generate_questions
from llava_reid.questioner.model import Batch, Questioner
from llava_reid.questioner.quality import well_formed_fraction
from llava_reid.questioner.sft_data import Example, load_examples, split_holdout
from llava_reid.questioner.vision import visual_tokens
from llava_reid.questioner.visual_cache import VisualTokenCache
from llava_reid.runtime import config_hash
from llava_reid.training import (
    BatchPlan,
    ResumableCheckpoint,
    TrainingLoop,
    inputs_fingerprint,
    make_accelerator,
    restore_file,
    warmup_cosine,
)

log = logging.getLogger(__name__)


def lora_target_regex(modules: list[str]) -> str:
    """peft target: the named linear layers inside the language model only."""
    names = "|".join(re.escape(m) for m in modules)
    return rf".*language_model\..*\.({names})$"


def load_base(model: str, cfg: dict[str, Any], device: torch.device) -> Questioner:
    """The base questioner, 4-bit when asked and possible, else the device's dtype."""
    qcfg = cfg["questioner"]
    if qcfg["load_in_4bit"]:
        if device.type == "cuda":
            try:
                return _load_4bit(model, qcfg, device)
            except ImportError:
                log.warning("load_in_4bit asked for but bitsandbytes is missing: loading bf16")
        else:
            log.warning("load_in_4bit needs a GPU: loading the full-precision model")
    return Questioner.from_pretrained(model, qcfg, device)


def _load_4bit(model: str, qcfg: dict[str, Any], device: torch.device) -> Questioner:
    import bitsandbytes  # noqa: F401
    from peft import prepare_model_for_kbit_training
    from transformers import (
        AutoTokenizer,
        BitsAndBytesConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    from llava_reid.questioner.model import attention_implementation

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
    )
    net = LlavaOnevisionForConditionalGeneration.from_pretrained(
        model, quantization_config=quant, dtype=torch.bfloat16, use_safetensors=True,
        attn_implementation=attention_implementation(device), device_map={"": device},
    )
    net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    return Questioner(net, AutoTokenizer.from_pretrained(model), qcfg, device)


def attach_lora(q: Questioner, qcfg: dict[str, Any], adapter: str | None = None) -> None:
    """A new LoRA adapter from the config, or continue training ``adapter``."""
    from peft import LoraConfig, get_peft_model

    for p in q.net.parameters():
        p.requires_grad_(False)
    if adapter:
        q.load_adapter(adapter, trainable=True)
    else:
        lora = qcfg["lora"]
        save = list(lora["modules_to_save"])
        if qcfg["train_projector"]:
            save.append("multi_modal_projector")
        q.net = get_peft_model(q.net, LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora_target_regex(lora["target_modules"]),
            modules_to_save=save or None, bias="none",
        ))
    if qcfg["sft"]["gradient_checkpointing"]:
        q.base.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


class SFTLoss(nn.Module):
    """Wraps the questioner so DDP sees one forward per step."""

    def __init__(self, q: Questioner):
        super().__init__()
        self.net = q.net
        self.q = q

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.q.loss(batch)


class ImageTokens:
    """Visual tokens of candidate images: from the cache, or online when the projector
    trains (gradients must reach it)."""

    def __init__(self, q: Questioner, cache: VisualTokenCache | None, paths: dict[int, Path]):
        self.q, self.cache, self.paths = q, cache, paths

    @classmethod
    def for_training(cls, q: Questioner, qcfg: dict[str, Any], visual_tokens: str,
                     annotations: str, image_root: str) -> ImageTokens:
        """The cache (checked against the model's visual weights) when the projector is
        frozen; the training images when it trains."""
        if not qcfg["train_projector"]:
            cache = VisualTokenCache(visual_tokens, q.device)
            cache.check_model(q)
            return cls(q, cache, {})
        from llava_reid.data.annotations import read_annotations

        rows = read_annotations(annotations, split="train")
        paths = {int(i): Path(image_root) / p
                 for i, p in zip(rows.image_idx, rows.file_path, strict=True)}
        return cls(q, None, paths)

    def __call__(self, image_ids: list[list[int]]) -> list[list[torch.Tensor]]:
        if self.cache is not None:
            return [self.cache.tokens(ids) for ids in image_ids]
        flat = [i for ids in image_ids for i in ids]
        images = []
        for i in flat:
            with Image.open(self.paths[i]) as img:
                images.append(img.convert("RGB"))
        pixels, sizes = self.q.preprocess.batch(images)
        dtype = next(self.q.base.model.vision_tower.parameters()).dtype
        tokens = visual_tokens(self.q.base, pixels.to(self.q.device, dtype), sizes,
                               self.q.pool_ratio)
        out, k = [], 0
        for ids in image_ids:
            out.append(tokens[k : k + len(ids)])
            k += len(ids)
        return out


def make_batch(q: Questioner, examples: list[Example], num_candidates: int,
               tokens: ImageTokens) -> Batch:
    image_ids = [e.top_k(num_candidates) for e in examples]
    prompts = [e.prompt(len(ids)) for e, ids in zip(examples, image_ids, strict=True)]
    return q.training_batch(prompts, image_ids, tokens(image_ids), [e.target for e in examples])


@torch.no_grad()
def heldout_report(q: Questioner, held: list[Example], num_candidates: int,
                   tokens: ImageTokens, batch_size: int, max_prompts: int) -> dict[str, Any]:
    """Held-out loss, and greedy questions scored for well-formedness."""
    if not held:
        return {}
    q.net.eval()
    losses = []
    for s in range(0, len(held), batch_size):
        losses.append(float(q.loss(make_batch(q, held[s : s + batch_size], num_candidates,
                                              tokens))))
    sample = held[:max_prompts]
    image_ids = [e.top_k(num_candidates) for e in sample]
    questions = generate_questions(
        q, [e.prompt(len(ids)) for e, ids in zip(sample, image_ids, strict=True)],
        image_ids, lambda ids: tokens([list(ids)])[0], [e.example_id for e in sample],
        GenerationConfig(max_new_tokens=40, do_sample=False), batch_size=batch_size,
    ).questions
    return {
        "heldout_loss": round(sum(losses) / len(losses), 4),
        "heldout_prompts": len(sample),
        "well_formed_fraction": round(well_formed_fraction(questions), 4),
        "exact_target_fraction": round(
            sum(qq.strip() == e.target.strip() for qq, e in zip(questions, sample, strict=True))
            / len(sample), 4),
        "examples": [{"target": e.target, "generated": qq}
                     for e, qq in zip(sample[:12], questions[:12], strict=True)],
    }


def run(cfg: dict[str, Any], model: str, conversations: str, visual_tokens: str,
        annotations: str, image_root: str, out: str, metrics: str, checkpoints: str) -> None:
    qcfg, scfg, seed = cfg["questioner"], cfg["questioner"]["sft"], cfg["seed"]
    ncand = cfg["dialogue"]["num_candidates"]
    accelerator = make_accelerator(cfg["device"], scfg["grad_accum"], seed)
    device = accelerator.device

    examples = load_examples(conversations)
    train, held = split_holdout(examples, scfg["holdout"], seed)
    q = load_base(model, cfg, device)
    tokens = ImageTokens.for_training(q, qcfg, visual_tokens, annotations, image_root)

    ckpt = ResumableCheckpoint(checkpoints, config_hash(
        {"questioner": qcfg, "dialogue": cfg["dialogue"], "seed": seed, "model": model,
         "data": conversations,
         "inputs": inputs_fingerprint(model, conversations, visual_tokens, annotations)}))
    state = ckpt.load_state()
    if state:
        restore_file(ckpt.last / "adapter", lambda path: attach_lora(q, qcfg, adapter=path))
    else:
        attach_lora(q, qcfg)
    trainable = [p for p in q.net.parameters() if p.requires_grad]
    log.info("trainable parameters: %.2f M of %.2f M", sum(p.numel() for p in trainable) / 1e6,
             sum(p.numel() for p in q.net.parameters()) / 1e6)

    plan = BatchPlan.make(len(train), scfg["batch_size"], accelerator.num_processes,
                          accelerator.process_index, conversations)
    updates_per_epoch = max(1, plan.steps // scfg["grad_accum"])
    total_updates = updates_per_epoch * scfg["epochs"]
    optimizer = torch.optim.AdamW(trainable, lr=scfg["lr"], weight_decay=scfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_updates, int(scfg["warmup_ratio"] * total_updates)))
    loop = TrainingLoop(
        "train-questioner", accelerator, SFTLoss(q), optimizer, scheduler, ckpt, state,
        lambda tmp: q.net.save_pretrained(tmp / "adapter"), plan, epochs=scfg["epochs"],
        seed=seed,
        lengths=[e.text_length() for e in train] if scfg["group_by_length"] else None,
        checkpoint_every=scfg["checkpoint_every"], max_grad_norm=scfg["max_grad_norm"],
        clip_params=trainable)

    def step(module, idx: list[int], epoch: int, s: int):
        return module(make_batch(q, [train[i] for i in idx], ncand, tokens)), {}

    started = time.time()
    state = loop.run(step)

    def write_outputs() -> None:
        q.net.eval()
        report = heldout_report(q, held, ncand, tokens, scfg["batch_size"],
                                scfg["eval_prompts"])
        losses = [h["loss"] for h in state["history"]]
        window = max(1, min(20, len(losses) // 10))
        result = {
            "examples": {"train": len(train), "heldout": len(held)},
            "first_loss": round(sum(losses[:window]) / window, 4),
            "last_loss": round(sum(losses[-window:]) / window, 4),
            "seconds_this_run": round(time.time() - started, 1),
            **report,
            "history": state["history"],
        }
        log.info("loss %.3f -> %.3f; held-out loss %s; well-formed %s", result["first_loss"],
                 result["last_loss"], report.get("heldout_loss"),
                 report.get("well_formed_fraction"))
        with atomic_dir(out) as tmp:
            q.net.save_pretrained(tmp)
        write_json(result, metrics)

    loop.finish(write_outputs)
