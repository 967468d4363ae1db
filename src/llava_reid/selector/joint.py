"""train-joint: the selector and the questioner's LoRA adapter trained together.

Per SFT example (a look-ahead dialogue step with its top-N retrieval pool):

1. the selector scores pool positions 1..N-1 (the top-1 is always shown) from the query's
   retriever text feature and the pool's cached image features, positions past the round's
   k_r (``sampler.valid_length``) masked;
2. a Gumbel top-k draw picks ``num_candidates - 1`` of them as a straight-through k-hot: exact
   0/1 values forward, the relaxed subset's gradient backward; the temperature is annealed
   linearly from ``temperature_start`` to ``temperature_end`` over training;
3. the picked images' visual tokens are multiplied by their k-hot value (1.0 forward) and
   shown to the questioner with the top-1, in rank order;
4. the questioner's NLL of the look-ahead-optimal question trains the LoRA adapter and,
   through the k-hot, the selector (its only training signal; no reward model).

Separate learning rates for the adapter and the selector; accelerate for bf16/DDP; resumable
checkpoints like the SFT stage. Output: ``joint/adapter/`` and ``joint/selector.safetensors``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_reid.artifacts import atomic_dir, read_table, write_json
from llava_reid.questioner.loading import ImageTokens, attach_lora, load_base
from llava_reid.questioner.sft_data import (
    Example,
    GainRepeats,
    load_examples,
    repeat_by_gain,
    split_holdout,
)
from llava_reid.retriever.encoder import RetrieverEncoder
from llava_reid.retriever.gallery import Gallery
from llava_reid.runtime import config_hash
from llava_reid.selector.model import Selector
from llava_reid.selector.sampler import (
    gumbel_topk,
    selectable_mask,
    temperature_at,
    topk_positions,
)
from llava_reid.stage_views import config_key, typed_view
from llava_reid.training import (
    BatchPlan,
    ResumableCheckpoint,
    TrainingLoop,
    derived_seed,
    inputs_fingerprint,
    make_accelerator,
    restore_file,
    warmup_cosine,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JointSchedule:
    """The ``joint`` section: how long and how fast the selector and the adapter train."""

    epochs: int
    batch_size: int  # global, split over processes
    grad_accum: int
    lr: float  # the adapter's
    selector_lr: float
    temperature_start: float  # Gumbel top-k temperature, annealed linearly to temperature_end
    temperature_end: float
    max_grad_norm: float  # 0 = no clipping
    checkpoint_every: int  # optimizer steps
    group_by_length: bool


@dataclass(frozen=True)
class JointConfig:
    """Every setting train-joint reads, built once from its validated config view."""

    seed: int
    device: str
    schedule: JointSchedule = config_key("joint")
    pool_size: int = config_key("dialogue.pool_size")
    num_candidates: int = config_key("dialogue.num_candidates")
    holdout: float = config_key("questioner.sft.holdout")  # the SFT stage's held-out share
    # The SFT stage's label weighting, so the adapter keeps learning from the same labels.
    repeat_by_gain: GainRepeats | None = config_key("questioner.sft.repeat_by_gain")
    text_batch_size: int = config_key("features.batch_size")
    # The questioner section as passed: what its loaders (load_base, attach_lora,
    # ImageTokens) read.
    questioner: Mapping[str, Any]

    def tag(self) -> dict[str, Any]:
        """The settings a resumable checkpoint must match (the config part of its tag)."""
        return {"questioner": self.questioner, "joint": dataclasses.asdict(self.schedule),
                "dialogue": {"pool_size": self.pool_size,
                             "num_candidates": self.num_candidates},
                "seed": self.seed}


class JointLoss(nn.Module):
    """Selector -> straight-through k-hot -> weighted visual tokens -> questioner NLL.

    One module so DDP sees a single forward that touches both the selector and the adapter.
    ``straight_through=False`` shows the same hard k-hot with no gradient to the selector (the
    ablation the tests compare against)."""

    def __init__(self, questioner, selector: Selector, gallery_feats: torch.Tensor,
                 gallery_ids: torch.Tensor, tokens: ImageTokens, pool_size: int,
                 num_candidates: int, straight_through: bool = True):
        super().__init__()
        self.net = questioner.net
        self.selector = selector
        self.q = questioner
        self.gallery_feats = gallery_feats  # [G, D] on the device, L2-normalised
        self.gallery_ids = gallery_ids  # [G] image_idx
        self.tokens = tokens
        self.pool_size, self.num_candidates = pool_size, num_candidates
        self.straight_through = straight_through

    def select(self, query_feats: torch.Tensor, pools: torch.Tensor, rounds: torch.Tensor,
               temperature: float, generator: torch.Generator,
               straight_through: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """k-hot [B, L-1] over pool positions 1..L-1, and the selector's scores."""
        valid = selectable_mask(rounds, self.pool_size, pools.shape[1])
        feats = self.gallery_feats[pools[:, 1:]]  # [B, L-1, D]
        scores = self.selector(query_feats, feats, valid)
        khot = gumbel_topk(scores, self.num_candidates - 1, temperature, generator,
                           hard=True, straight_through=straight_through)
        return khot, scores

    def forward(self, examples: list[Example], query_feats: torch.Tensor, pools: torch.Tensor,
                rounds: torch.Tensor, temperature: float, generator: torch.Generator
                ) -> torch.Tensor:
        khot, _ = self.select(query_feats, pools, rounds, temperature, generator,
                              self.straight_through)
        image_ids, weighted = [], []
        for b in range(len(examples)):
            picked = (khot[b].detach() > 0.5).nonzero().flatten()  # column = position - 1
            rows = [int(pools[b, 0])] + [int(pools[b, int(c) + 1]) for c in picked]
            ids = [int(self.gallery_ids[r]) for r in rows]
            toks = self.tokens([ids])[0]
            weights = [None] + [khot[b, int(c)] for c in picked]
            weighted.append([t if w is None else t * w.to(t.dtype) for t, w in
                             zip(toks, weights, strict=True)])
            image_ids.append(ids)
        prompts = [e.prompt(len(ids)) for e, ids in zip(examples, image_ids, strict=True)]
        batch = self.q.training_batch(prompts, image_ids, weighted, [e.target for e in examples])
        return self.q.loss(batch)


def query_features(retriever: str, device_pref: str, examples: list[Example],
                   descriptions: dict[int, str], batch_size: int) -> torch.Tensor:
    """Retriever text feature of each example's query so far [E, D] (fixed, computed once)."""
    encoder = RetrieverEncoder.from_pretrained(retriever, device_pref)
    feats, _ = encoder.encode_texts_once([descriptions[e.example_id] for e in examples],
                                         batch_size)
    return feats


def run(cfg: dict[str, Any], model: str, adapter: str, selector: str, conversations: str,
        gallery: str, retriever: str, visual_tokens: str, annotations: str, image_root: str,
        out_adapter: str, out_selector: str, metrics: str, checkpoints: str) -> None:
    settings = typed_view(JointConfig, cfg)
    schedule, qcfg, seed = settings.schedule, settings.questioner, settings.seed
    accelerator = make_accelerator(settings.device, schedule.grad_accum, seed)
    device = accelerator.device

    table = read_table(conversations, "conversations", columns=["example_id", "description"])
    descriptions = dict(zip(table.column("example_id").to_pylist(),
                            table.column("description").to_pylist(), strict=True))
    examples, held = split_holdout(load_examples(conversations), settings.holdout, seed)
    if settings.repeat_by_gain is not None:
        examples = repeat_by_gain(examples, settings.repeat_by_gain.unit,
                                  settings.repeat_by_gain.max_repeats)
    query_feats = query_features(retriever, settings.device, examples, descriptions,
                                 settings.text_batch_size)
    train_gallery = Gallery.from_parquet(gallery, device)
    position = train_gallery.position_of()
    pools = torch.tensor([[position[i] for i in e.pool] for e in examples], dtype=torch.long)
    rounds = torch.tensor([e.round for e in examples], dtype=torch.long)

    q = load_base(model, qcfg, device)
    tokens = ImageTokens.for_training(q, qcfg, visual_tokens, annotations, image_root)

    ckpt = ResumableCheckpoint(checkpoints, config_hash(
        {**settings.tag(), "model": model, "adapter": adapter, "selector": selector,
         "data": conversations,
         "inputs": inputs_fingerprint(model, adapter, selector, conversations, gallery,
                                      retriever, visual_tokens, annotations)}))
    state = ckpt.load_state()
    if state:
        restore_file(ckpt.last / "adapter", lambda path: attach_lora(q, qcfg, adapter=path))
        sel = restore_file(ckpt.last / "selector.safetensors",
                           lambda path: Selector.load(path, device))
    else:
        attach_lora(q, qcfg, adapter=adapter)
        sel = Selector.load(selector, device)
    sel.train()
    module = JointLoss(q, sel, train_gallery.feats, train_gallery.image_idx, tokens,
                       settings.pool_size, settings.num_candidates)
    lora_params = [p for p in q.net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": lora_params, "lr": schedule.lr},
        {"params": list(sel.parameters()), "lr": schedule.selector_lr},
    ], weight_decay=0.0)

    plan = BatchPlan.make(len(examples), schedule.batch_size, accelerator.num_processes,
                          accelerator.process_index, conversations)
    total_steps = plan.steps * schedule.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        max(1, total_steps // schedule.grad_accum), 0))

    def save_models(tmp: Path) -> None:
        q.net.save_pretrained(tmp / "adapter")
        sel.save(tmp / "selector.safetensors")

    loop = TrainingLoop(
        "train-joint", accelerator, module, optimizer, scheduler, ckpt, state, save_models, plan,
        epochs=schedule.epochs, seed=seed,
        lengths=[e.text_length() for e in examples] if schedule.group_by_length else None,
        checkpoint_every=schedule.checkpoint_every, max_grad_norm=schedule.max_grad_norm,
        clip_params=lora_params + list(sel.parameters()))

    def step(wrapped, idx: list[int], epoch: int, s: int):
        global_step = (epoch - 1) * plan.steps + s
        tau = temperature_at(global_step, total_steps, schedule.temperature_start,
                             schedule.temperature_end)
        gen = torch.Generator().manual_seed(derived_seed(seed, epoch, s, plan.rank, 11))
        loss = wrapped([examples[i] for i in idx], query_feats[idx].to(device),
                       pools[idx].to(device), rounds[idx].to(device), tau, gen)
        return loss, {"record": {"tau": round(tau, 4)}}

    started = time.time()
    state = loop.run(step)

    def write_outputs() -> None:
        losses = [h["loss"] for h in state["history"]]
        window = max(1, min(20, len(losses) // 10))
        agreement = topk_agreement(module, query_feats, pools, rounds, device)
        result = {
            "examples": len(examples),
            "first_loss": round(sum(losses[:window]) / window, 4),
            "last_loss": round(sum(losses[-window:]) / window, 4),
            "selector_agrees_with_plain_topk": agreement,
            "seconds_this_run": round(time.time() - started, 1),
            "history": state["history"],
        }
        log.info("joint loss %.3f -> %.3f; selector = plain top-k on %.1f%% of pools",
                 result["first_loss"], result["last_loss"], 100 * agreement)
        with atomic_dir(out_adapter) as tmp:
            q.net.save_pretrained(tmp)
        sel.eval()
        sel.save(out_selector, extra={"stage": "train-joint"})
        write_json(result, metrics)

    loop.finish(write_outputs)


@torch.no_grad()
def topk_agreement(module: JointLoss, query_feats, pools, rounds, device, limit: int = 2000
                   ) -> float:
    """Share of pools where the trained selector's deterministic choice is plain top-k."""
    sel = module.selector.eval()
    n = min(limit, len(pools))
    valid = selectable_mask(rounds[:n].to(device), module.pool_size, pools.shape[1])
    scores = sel(query_feats[:n].to(device), module.gallery_feats[pools[:n, 1:].to(device)],
                 valid)
    chosen = topk_positions(scores, module.num_candidates - 1)
    plain = torch.arange(module.num_candidates - 1, device=chosen.device)
    return round(float((chosen == plain).all(dim=1).float().mean()), 4)
