"""warmup-selector: teach the selector to imitate plain top-k before joint training.

Joint training gives the selector only a weak, indirect signal (the questioner's likelihood of
the look-ahead question), so it starts from a selector that already reproduces what plain
top-k would show: for each training dialogue state the targets are pool positions
1..c-1 (c = ``num_candidates``; position 0, the top-1, is always shown and not scored).

Exact imitation is a precision problem: neighbouring images of a pool differ in similarity by
a tiny fraction of the pool's spread, and a transformer on raw features ranks them poorly
(figures: bench/RESULTS.md, "Selector warm-up"). The model's optional ``retrieval_prior`` adds
the query-image cosine, times a learned scale, to its logits, with a zero-initialised head: it
starts as exactly plain top-k and the transformer learns corrections. The scale has its own,
larger learning rate (``prior_lr``) so that the still-noisy head cannot outgrow the prior.

Loss. The default (``plackett_luce``) is the negative log-probability that the joint-training
sampler, a Gumbel-top-k draw from these very scores (a Plackett-Luce draw without
replacement), returns exactly the target set, in any order: the maximum-likelihood fit of the
distribution that joint training starts sampling from, with no preference for how the targets
share their mass. It is computed exactly by summing the (c-1)! orderings. ``bce`` (binary
cross-entropy of exp(score) against 1 on the targets: a softmax cross-entropy with a uniform
soft label on the targets) is kept for comparison. ``pool_dropout`` (optional augmentation)
hides random pool positions so that the targets move deeper into the ranking.

Evaluation. A seeded fraction of identities is held out (every image of a held-out identity,
hence every dialogue round of those images, so no near-duplicate description leaks into
training). The reported agreement is the share of held-out pools where the selector's
deterministic top-(c-1) is exactly plain top-k's set; the mean overlap is the average share of
the c-1 images the two have in common.

Image features come from the cached gallery Parquet, query features from the trained
retriever's text tower, computed once: training then runs on tensors only.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llava_reid.artifacts import ArtifactError, read_table, write_json
from llava_reid.retriever.encoder import RetrieverEncoder
from llava_reid.retriever.gallery import Gallery
from llava_reid.runtime import config_hash, resolve_device, seed_everything
from llava_reid.selector.model import Selector
from llava_reid.selector.sampler import selectable_mask, topk_positions
from llava_reid.stage_views import config_key, typed_view

log = logging.getLogger(__name__)

LOSSES = ("plackett_luce", "bce")
TRAIN_EVAL_ROWS = 1000  # training pools (at least) on which the fit is measured


@dataclass(frozen=True)
class SelectorArchitecture:
    """The ``selector`` section's model settings: what a fresh :class:`Selector` is built of."""

    layers: int
    heads: int
    ffn: int
    dropout: float
    retrieval_prior: bool


@dataclass(frozen=True)
class WarmupSchedule:
    """The ``selector.warmup`` section (loss, prior_lr and pool_dropout: the schema's defaults
    when a config leaves them out)."""

    epochs: int
    batch_size: int  # pools per step, one round per batch
    lr: float
    prior_lr: float  # the retrieval prior's log-scale
    loss: str  # one of LOSSES
    pool_dropout: float
    holdout: float  # share of identities held out to measure agreement
    text_batch_size: int


@dataclass(frozen=True)
class WarmupConfig:
    """Every setting warmup-selector reads, built once from its validated config view."""

    seed: int
    device: str
    architecture: SelectorArchitecture = config_key("selector")
    schedule: WarmupSchedule = config_key("selector.warmup")
    pool_size: int = config_key("dialogue.pool_size")
    num_candidates: int = config_key("dialogue.num_candidates")
    # The section as passed: the artifact's config hash covers it whole.
    selector: Mapping[str, Any]

    def tag(self) -> dict[str, Any]:
        """What the warmed-up selector's ``config_hash`` is computed from."""
        return {"selector": self.selector,
                "dialogue": {"pool_size": self.pool_size, "num_candidates": self.num_candidates},
                "seed": self.seed}


# -- data ------------------------------------------------------------------------------------


def holdout_mask(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows whose group (identity) falls in a seeded ``fraction`` of the groups. [R] bool."""
    unique = np.unique(groups)
    n_out = min(len(unique) - 1, math.ceil(fraction * len(unique))) if fraction > 0 else 0
    rng = np.random.default_rng([seed, 2718])
    out = rng.permutation(unique)[: max(n_out, 0)]
    return np.isin(groups, out)


def round_batches(rounds: torch.Tensor, rows: torch.Tensor, batch_size: int,
                  generator: torch.Generator | None) -> list[torch.Tensor]:
    """Batches of ``rows`` that share a round, shuffled when a generator is given.

    One round per batch means one valid length per batch, so the selector only runs over that
    many positions (round 4 has a fifth of round 0's pool).
    """
    batches = []
    for r in torch.unique(rounds[rows]).tolist():
        members = rows[rounds[rows] == r]
        if generator is not None:
            members = members[torch.randperm(len(members), generator=generator)]
        batches.extend(members.split(batch_size))
    if generator is not None:
        order = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in order]
    return batches


def _batch(query_feats, pool_rows, valid, gallery_feats, idx, device):
    """Inputs of one batch on ``device``, cut to the batch's longest valid prefix."""
    width = max(int(valid[idx].sum(1).max()), 1)
    pool = pool_rows[idx, 1 : 1 + width]  # [b, W] gallery rows of pool positions 1..W
    return (
        query_feats[idx].to(device),  # [b, D]
        gallery_feats[pool.to(gallery_feats.device)].to(device),  # [b, W, D]
        valid[idx, :width].to(device),  # [b, W]
    )


def drop_positions(valid: torch.Tensor, n_targets: int, rate: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide each valid position with probability ``rate``; returns (valid, targets [b, n]).

    The targets are what plain top-k shows for the thinned pool: its first n kept positions
    (the pool is in ranking order). The selector then has to rank deeper into the pool rather
    than learn which images follow which description. Rows that would keep fewer than n
    positions stay whole. rate 0 gives the stored pool and targets 0..n-1.
    """
    b, width = valid.shape
    if rate > 0:
        hide = (torch.rand(b, width, generator=generator) < rate).to(valid.device)
        kept = valid & ~hide
        valid = torch.where((kept.sum(1) >= n_targets).unsqueeze(1), kept, valid)
    # Earlier positions get larger keys; hidden ones 0; stable sort keeps ties in order.
    keys = (width - torch.arange(width, device=valid.device)) * valid
    targets = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :n_targets]
    return valid, targets


# -- losses ----------------------------------------------------------------------------------


def bce_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE(exp(score), 1) on the targets = mean -score (clamped at -100).

    scores: [B, P] log-probabilities; targets: [B, n] target columns.
    """
    return -scores.gather(1, targets).clamp_min(-100.0).mean()


def plackett_luce_set_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log P(a Gumbel-top-n draw from ``scores`` is exactly the ``targets`` set), batch mean.

    scores: [B, P] log-probabilities over the valid positions (-1e4 elsewhere); targets:
    [B, n] columns. The draw picks positions one after another with probability proportional
    to exp(score) among those left; the set's probability sums that over the n! orders. The
    normaliser after taking a subset A of the targets is logsumexp over the rest, computed
    once per subset (2^n - 1 of them).
    """
    batch, n_targets = targets.shape
    masked = scores.masked_fill(scores <= -5e3, -math.inf)  # [B, P]
    picked = scores.gather(1, targets)  # [B, n]
    norm = {}
    for subset in range(2**n_targets - 1):
        taken = [j for j in range(n_targets) if subset >> j & 1]
        drop = torch.zeros_like(masked, dtype=torch.bool)
        if taken:
            drop.scatter_(1, targets[:, taken], True)
        norm[subset] = torch.logsumexp(masked.masked_fill(drop, -math.inf), dim=1)  # [B]
    orders = []
    for perm in itertools.permutations(range(n_targets)):
        subset, logp = 0, scores.new_zeros(batch)
        for j in perm:
            logp = logp + picked[:, j] - norm[subset]
            subset |= 1 << j
        orders.append(logp)
    return -torch.logsumexp(torch.stack(orders, dim=1), dim=1).mean()


def warmup_loss(kind: str, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if kind == "plackett_luce":
        return plackett_luce_set_loss(scores, targets)
    if kind == "bce":
        return bce_loss(scores, targets)
    raise ValueError(f"unknown selector warm-up loss {kind!r}; known: {LOSSES}")


# -- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def agreement_with_topk(model: Selector, query_feats, pool_rows, rounds, valid, gallery_feats,
                        rows: torch.Tensor, n_targets: int, batch_size: int,
                        device: torch.device) -> dict[str, Any]:
    """How often the selector's deterministic top-n equals plain top-k's (columns 0..n-1)."""
    was_training = model.training
    model.eval()
    exact = torch.zeros(len(query_feats), dtype=torch.bool)
    overlap = torch.zeros(len(query_feats))
    for idx in round_batches(rounds, rows, batch_size, generator=None):
        scores = model(*_batch(query_feats, pool_rows, valid, gallery_feats, idx, device))
        picked = topk_positions(scores, n_targets).cpu()  # [b, n] columns, rank order
        hits = ((picked >= 0) & (picked < n_targets)).sum(1)  # [b]
        exact[idx] = hits == n_targets
        overlap[idx] = hits.float() / n_targets
    model.train(was_training)
    if len(rows) == 0:
        return {"agreement": None, "mean_overlap": None, "agreement_per_round": {}}
    per_round = {
        str(r): round(float(exact[rows][rounds[rows] == r].float().mean()), 4)
        for r in torch.unique(rounds[rows]).tolist()
    }
    return {
        "agreement": round(float(exact[rows].float().mean()), 4),
        "mean_overlap": round(float(overlap[rows].mean()), 4),
        "agreement_per_round": per_round,
    }


# -- training --------------------------------------------------------------------------------


def _param_groups(model: Selector, prior_lr: float) -> list[dict[str, Any]]:
    prior = [p for n, p in model.named_parameters() if n == "prior_log_scale"]
    rest = [p for n, p in model.named_parameters() if n != "prior_log_scale"]
    groups = [{"params": rest}]
    if prior:
        groups.append({"params": prior, "lr": prior_lr})
    return groups


def train_warmup(
    query_feats: torch.Tensor,
    pool_rows: torch.Tensor,
    rounds: torch.Tensor,
    gallery_feats: torch.Tensor,
    heldout: torch.Tensor,
    *,
    pool_size: int,
    num_candidates: int,
    architecture: SelectorArchitecture,
    schedule: WarmupSchedule,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[Selector, dict[str, Any]]:
    """Fit a fresh selector to plain top-k; returns it (eval mode) and the metrics.

    query_feats: [R, D] retriever text features of each row's description (L2-normalised);
    pool_rows: [R, L] gallery rows of each pool, best first (L <= pool_size);
    rounds: [R] 0-based rounds; gallery_feats: [G, D] L2-normalised image features;
    heldout: [R] bool, rows kept out of training and used for the agreement metric.
    architecture: the fresh selector's settings; schedule: how it trains (``holdout`` and
    ``text_batch_size`` are the stage's, not read here).
    """
    device = torch.device(device)
    n_targets = num_candidates - 1
    if n_targets < 1:
        raise ValueError("selector warm-up needs num_candidates >= 2")
    loss_kind = schedule.loss
    if loss_kind not in LOSSES:
        raise ValueError(f"unknown selector warm-up loss {loss_kind!r}; known: {LOSSES}")
    rounds = rounds.long().cpu()
    pool_rows = pool_rows.long().cpu()
    valid = selectable_mask(rounds, pool_size, pool_rows.shape[1])  # [R, L-1]
    usable = valid.sum(1) >= n_targets  # rows where plain top-k has n_targets to show
    heldout = heldout.bool().cpu()
    train_rows = torch.nonzero(usable & ~heldout).squeeze(1)
    test_rows = torch.nonzero(usable & heldout).squeeze(1)
    if len(train_rows) == 0:
        raise ValueError("selector warm-up: no training pools (all held out or too short)")

    seed_everything(seed)
    model = Selector(gallery_feats.shape[1], **dataclasses.asdict(architecture)).to(device)
    optimizer = torch.optim.Adam(_param_groups(model, schedule.prior_lr), lr=schedule.lr)
    order_gen = torch.Generator().manual_seed(seed)
    gallery_feats = gallery_feats.to(device)
    query_feats = query_feats.float()
    eval_bs = 4 * schedule.batch_size
    drop_rate = schedule.pool_dropout

    held = agreement_with_topk(model, query_feats, pool_rows, rounds, valid, gallery_feats,
                               test_rows, n_targets, eval_bs, device)
    history = [{"epoch": 0, "loss": None, "heldout_agreement": held["agreement"],
                "heldout_mean_overlap": held["mean_overlap"], "seconds": 0.0}]
    for epoch in range(1, schedule.epochs + 1):
        start, total, count = time.perf_counter(), 0.0, 0
        model.train()
        for idx in round_batches(rounds, train_rows, schedule.batch_size, order_gen):
            query, pool, keep = _batch(query_feats, pool_rows, valid, gallery_feats, idx, device)
            keep, targets = drop_positions(keep, n_targets, drop_rate, order_gen)
            loss = warmup_loss(loss_kind, model(query, pool, keep), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        held = agreement_with_topk(model, query_feats, pool_rows, rounds, valid, gallery_feats,
                                   test_rows, n_targets, eval_bs, device)
        history.append({
            "epoch": epoch, "loss": round(total / count, 5),
            "heldout_agreement": held["agreement"], "heldout_mean_overlap": held["mean_overlap"],
            "seconds": round(time.perf_counter() - start, 2),
        })
        log.info("selector warm-up epoch %d/%d: loss %.4f, held-out agreement %s, overlap %s "
                 "(%.1fs)", epoch, schedule.epochs, history[-1]["loss"], held["agreement"],
                 held["mean_overlap"], history[-1]["seconds"])

    model.eval()
    # Training-set agreement (fit vs. generalisation) on a seeded sample, to keep it cheap.
    sample = train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(
        seed))[: max(len(test_rows), TRAIN_EVAL_ROWS)]]
    trained = agreement_with_topk(model, query_feats, pool_rows, rounds, valid, gallery_feats,
                                  sample, n_targets, eval_bs, device)
    metrics = {
        "loss": loss_kind,
        "num_candidates": num_candidates,
        "pool_size": pool_size,
        "train_pools": len(train_rows),
        "heldout_pools": len(test_rows),
        "skipped_pools": int((~usable).sum()),
        "heldout_agreement": held["agreement"],
        "heldout_mean_overlap": held["mean_overlap"],
        "heldout_agreement_per_round": held["agreement_per_round"],
        "train_agreement": trained["agreement"],
        "train_mean_overlap": trained["mean_overlap"],
        "history": history,
        "selector": model.config,
    }
    if model.config.get("retrieval_prior"):
        metrics["prior_scale"] = round(float(model.prior_log_scale.detach().exp()), 3)
    return model, metrics


# -- stage -----------------------------------------------------------------------------------


def load_pools(conversations: str, position_of: dict[int, int]):
    """Non-augmented rows of conversations.parquet as (descriptions, pool rows, rounds, pids)."""
    table = read_table(conversations, "conversations",
                       columns=["pid", "round", "description", "idk_augmented", "pool"])
    frame = table.to_pandas()
    frame = frame[~frame.idk_augmented.astype(bool)].reset_index(drop=True)
    if frame.empty:
        raise ArtifactError(f"{conversations}: no non-augmented conversations to warm up on")
    lengths = frame.pool.map(len)
    if lengths.nunique() != 1:
        raise ArtifactError(f"{conversations}: pools of different lengths {sorted(set(lengths))}")
    pools = np.stack(frame.pool.to_numpy()).astype(np.int64)  # [R, L] image_idx
    try:
        rows = np.vectorize(position_of.__getitem__, otypes=[np.int64])(pools)
    except KeyError as exc:
        raise ArtifactError(f"{conversations}: pool image_idx {exc} not in the gallery") from exc
    return (list(frame.description), torch.from_numpy(rows),
            torch.tensor(frame["round"].to_numpy(), dtype=torch.long),
            frame.pid.to_numpy())


def pool_order_consistency(query_feats: torch.Tensor, pool_rows: torch.Tensor,
                           gallery_feats: torch.Tensor, top: int, chunk: int = 1024) -> float:
    """Share of pools whose stored first ``top`` positions are still the ``top`` most similar
    under ``query_feats`` (a check that the retriever given is the one that built the pools)."""
    ok = 0
    for s in range(0, len(pool_rows), chunk):
        feats = gallery_feats[pool_rows[s : s + chunk]]  # [c, L, D]
        sims = torch.einsum("cd,cld->cl", query_feats[s : s + chunk], feats)  # [c, L]
        if sims.shape[1] <= top:
            ok += len(sims)
            continue
        ok += int((sims[:, :top].min(1).values >= sims[:, top:].max(1).values - 1e-5).sum())
    return ok / max(len(pool_rows), 1)


def run(cfg: dict[str, Any], conversations: str, gallery: str, retriever: str, out: str,
        metrics: str) -> None:
    settings = typed_view(WarmupConfig, cfg)
    schedule, seed = settings.schedule, settings.seed
    device = resolve_device(settings.device)
    train_gallery = Gallery.from_parquet(gallery, "cpu")
    texts, pool_rows, rounds, pids = load_pools(conversations, train_gallery.position_of())

    # Query features are fixed: encode each distinct description once, then free the encoder.
    encoder = RetrieverEncoder.from_pretrained(retriever, settings.device)
    query_feats, distinct = encoder.encode_texts_once(texts, schedule.text_batch_size)  # [R, D]
    del encoder
    if query_feats.shape[1] != train_gallery.feats.shape[1]:
        raise ValueError(f"retriever text dim {query_feats.shape[1]} != gallery dim "
                         f"{train_gallery.feats.shape[1]}")

    consistency = pool_order_consistency(query_feats, pool_rows, train_gallery.feats,
                                         settings.num_candidates)
    if consistency < 0.99:
        log.warning("the retriever's features reproduce the stored top-%d of only %.1f%% of the "
                    "pools: is %s the retriever that built %s?", settings.num_candidates,
                    100 * consistency, retriever, conversations)
    heldout = torch.from_numpy(holdout_mask(pids, schedule.holdout, seed))
    model, result = train_warmup(
        query_feats, pool_rows, rounds, train_gallery.feats, heldout,
        pool_size=settings.pool_size, num_candidates=settings.num_candidates,
        architecture=settings.architecture, schedule=schedule, seed=seed, device=device,
    )
    tag = config_hash(settings.tag())
    model.save(out, extra={"stage": "warmup-selector", "config_hash": tag,
                           "retriever": str(retriever), "conversations": str(conversations)})
    result.update({"config_hash": tag, "device": str(device), "distinct_descriptions": distinct,
                   "pool_order_consistency": round(consistency, 4)})
    write_json(result, metrics)
    log.info("selector warm-up: held-out agreement %s on %d pools -> %s",
             result["heldout_agreement"], result["heldout_pools"], out)
