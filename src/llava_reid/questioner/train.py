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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llava_reid.artifacts import atomic_dir, write_json
from llava_reid.questioner.generate import GenerationConfig, generate_questions
from llava_reid.questioner.loading import ImageTokens, attach_lora, load_base
from llava_reid.questioner.model import Batch, Questioner
from llava_reid.questioner.quality import well_formed_fraction
from llava_reid.questioner.sft_data import (
    Example,
    GainRepeats,
    load_examples,
    repeat_by_gain,
    split_holdout,
)
from llava_reid.runtime import config_hash
from llava_reid.stage_views import config_key, typed_view
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


class SFTLoss(nn.Module):
    """Wraps the questioner so DDP sees one forward per step."""

    def __init__(self, q: Questioner):
        super().__init__()
        self.net = q.net
        self.q = q

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.q.loss(batch)


def make_batch(q: Questioner, examples: list[Example], num_candidates: int,
               tokens: ImageTokens, image_ids: list[list[int]] | None = None) -> Batch:
    """A training batch; the candidates are each example's pool top-k unless ``image_ids``
    names others (bench/image_reliance.py)."""
    if image_ids is None:
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


@dataclass(frozen=True)
class SFTSchedule:
    """What train-questioner reads of ``questioner.sft`` (``gradient_checkpointing`` is read
    by ``attach_lora``)."""

    epochs: int
    batch_size: int  # global, split over processes
    grad_accum: int
    lr: float
    warmup_ratio: float  # share of the optimizer updates spent warming up
    weight_decay: float
    max_grad_norm: float  # 0 = no clipping
    checkpoint_every: int  # optimizer steps
    holdout: float  # share of the conversations held out
    eval_prompts: int  # held-out prompts answered greedily at the end
    group_by_length: bool
    repeat_by_gain: GainRepeats | None  # None: every example once per epoch


@dataclass(frozen=True)
class SFTConfig:
    """Every setting train-questioner reads, built once from its validated config view."""

    seed: int
    device: str
    sft: SFTSchedule = config_key("questioner.sft")
    num_candidates: int = config_key("dialogue.num_candidates")
    # The questioner section as passed: what its loaders (load_base, attach_lora,
    # ImageTokens) read.
    questioner: Mapping[str, Any]

    def tag(self) -> dict[str, Any]:
        """The settings a resumable checkpoint must match (the config part of its tag)."""
        return {"questioner": self.questioner,
                "dialogue": {"num_candidates": self.num_candidates}, "seed": self.seed}


def run(cfg: dict[str, Any], model: str, conversations: str, visual_tokens: str,
        annotations: str, image_root: str, out: str, metrics: str, checkpoints: str) -> None:
    settings = typed_view(SFTConfig, cfg)
    qcfg, sft, seed = settings.questioner, settings.sft, settings.seed
    ncand = settings.num_candidates
    accelerator = make_accelerator(settings.device, sft.grad_accum, seed)
    device = accelerator.device

    examples = load_examples(conversations)
    train, held = split_holdout(examples, sft.holdout, seed)
    if sft.repeat_by_gain is not None:
        kept = len(train)
        train = repeat_by_gain(train, sft.repeat_by_gain.unit, sft.repeat_by_gain.max_repeats)
        log.info("repeat_by_gain: %d training examples -> %d per epoch", kept, len(train))
    q = load_base(model, qcfg, device)
    tokens = ImageTokens.for_training(q, qcfg, visual_tokens, annotations, image_root)

    ckpt = ResumableCheckpoint(checkpoints, config_hash(
        {**settings.tag(), "model": model, "data": conversations,
         "inputs": inputs_fingerprint(model, conversations, visual_tokens, annotations)}))
    state = ckpt.load_state()
    if state:
        restore_file(ckpt.last / "adapter", lambda path: attach_lora(q, qcfg, adapter=path))
    else:
        attach_lora(q, qcfg)
    trainable = [p for p in q.net.parameters() if p.requires_grad]
    log.info("trainable parameters: %.2f M of %.2f M", sum(p.numel() for p in trainable) / 1e6,
             sum(p.numel() for p in q.net.parameters()) / 1e6)

    plan = BatchPlan.make(len(train), sft.batch_size, accelerator.num_processes,
                          accelerator.process_index, conversations)
    updates_per_epoch = max(1, plan.steps // sft.grad_accum)
    total_updates = updates_per_epoch * sft.epochs
    optimizer = torch.optim.AdamW(trainable, lr=sft.lr, weight_decay=sft.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_updates, int(sft.warmup_ratio * total_updates)))
    loop = TrainingLoop(
        "train-questioner", accelerator, SFTLoss(q), optimizer, scheduler, ckpt, state,
        lambda tmp: q.net.save_pretrained(tmp / "adapter"), plan, epochs=sft.epochs,
        seed=seed,
        lengths=[e.text_length() for e in train] if sft.group_by_length else None,
        checkpoint_every=sft.checkpoint_every, max_grad_norm=sft.max_grad_norm,
        clip_params=trainable)

    def step(module, idx: list[int], epoch: int, s: int):
        return module(make_batch(q, [train[i] for i in idx], ncand, tokens)), {}

    started = time.time()
    state = loop.run(step)

    def write_outputs() -> None:
        q.net.eval()
        report = heldout_report(q, held, ncand, tokens, sft.batch_size,
                                sft.eval_prompts)
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
