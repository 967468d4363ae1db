"""prepare-data: look-ahead labels and SFT conversations for the questioner, in Parquet.

For every training image, up to ``dialogue.rounds`` look-ahead steps pick, among the image's
annotated answers not used yet, the one whose addition to the query ranks the target highest
against the training gallery (cached features). Each step becomes one SFT example: the
dialogue so far, the question whose answer was chosen as the target, a seeded prompt template
and the top-N retrieval pool of the query so far.

Whose answers the dialogue goes on with: on a look-ahead dialogue, the chosen one's. A seeded
fraction ``prepare.random_history`` of dialogues goes on with a random unused answer instead,
while every step's target stays the look-ahead's choice. Look-ahead histories alone show the
questioner only the states the oracle visits, while at evaluation its own questions lead
elsewhere: random histories teach it what to ask from such states.

With ``prepare.cross_fit`` K >= 2, each training image's look-ahead runs with the retriever
trained without its identity's fold, against that fold's images (llava_reid.data.folds): the
labels then rate answers as the retriever will on unseen people. Retrieval pools always come
from the trained retriever and the whole training gallery, as at evaluation.

A seeded fraction of dialogues is duplicated with some history answers replaced by "I don't
know." so the questioner learns not to repeat such questions.

Runs in one process, or sharded over processes when launched with torchrun (results are
gathered on rank 0, which writes). The oracle's R@1 per round is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from llava_reid.answerer.base import IDK
from llava_reid.artifacts import ArtifactError, write_table
from llava_reid.data.annotations import read_annotations
from llava_reid.dialogue.oracle import best_next_answers, usable_answers
from llava_reid.dialogue.query import append_answer
from llava_reid.questioner.prompts import NUM_TEMPLATES
from llava_reid.retriever.encoder import RetrieverEncoder
from llava_reid.retriever.gallery import Gallery
from llava_reid.runtime import config_hash
from llava_reid.stage_views import config_key, typed_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSettings:
    """The ``prepare`` section."""

    min_remaining: int  # stop a dialogue once fewer usable answers are left
    batch_size: int  # look-ahead queries (and pool descriptions) encoded at once
    idk_duplicate_prob: float
    idk_answer_prob: float
    random_history: float
    cross_fit: int  # 0: labels from the trained retriever; K >= 2: from K fold retrievers


@dataclass(frozen=True)
class PrepareConfig:
    """Every setting prepare-data reads, built once from its validated config view."""

    seed: int
    device: str
    prepare: PrepareSettings
    rounds: int = config_key("dialogue.rounds")
    pool_size: int = config_key("dialogue.pool_size")

    def tag(self) -> dict[str, Any]:
        """What the plan's and the conversations' ``config_hash`` is computed from."""
        return {"prepare": dataclasses.asdict(self.prepare),
                "dialogue": {"rounds": self.rounds, "pool_size": self.pool_size},
                "seed": self.seed}


def follows_random(seed: int, image_idx: int, fraction: float) -> bool:
    """Whether the image's dialogue goes on with random answers (seeded per image)."""
    return fraction > 0 and np.random.default_rng([seed, 23, image_idx]).random() < fraction


def plan_dialogues(encoder, gallery: Gallery, rows: pd.DataFrame, rounds: int,
                   min_remaining: int, batch_size: int, random_history: float = 0.0,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Run the look-ahead for ``rows``; one plan record per (image, round) with a choice:
    ``answer_index`` is the look-ahead's choice (the SFT target), ``followed_index`` the answer
    the dialogue went on with (the same on look-ahead dialogues)."""
    pids = torch.as_tensor(rows.pid.to_numpy().copy())
    randomly = [follows_random(seed, int(i), random_history) for i in rows.image_idx]
    queries = list(rows.initial_description)
    answers = [list(a) for a in rows.answers]
    used: list[set[int]] = [set() for _ in queries]
    feats = encoder.encode_texts(queries, batch_size)
    ranks = gallery.target_ranks(feats, pids).tolist()
    active = list(range(len(rows)))
    plan: list[dict[str, Any]] = []
    started = time.perf_counter()
    for r in range(rounds):
        if not active:
            break
        log.info("look-ahead round %d/%d: %d dialogues (%.0f s so far)", r + 1, rounds,
                 len(active), time.perf_counter() - started)
        choices = best_next_answers(
            encoder, gallery, [queries[i] for i in active], [answers[i] for i in active],
            [used[i] for i in active], pids[active], [ranks[i] for i in active],
            min_remaining=min_remaining, batch_size=batch_size,
        )
        still, rerank = [], []
        for i, choice in zip(active, choices, strict=True):
            if choice.answer_index < 0:
                continue
            image_idx = int(rows.image_idx.iloc[i])
            followed = choice.answer_index
            if randomly[i]:
                options = usable_answers(queries[i], answers[i], used[i])
                pick = np.random.default_rng([seed, 29, image_idx, r]).integers(len(options))
                followed = options[int(pick)]
            plan.append({
                "image_idx": image_idx, "pid": int(rows.pid.iloc[i]), "round": r,
                "answer_index": choice.answer_index, "followed_index": followed,
                "random_history": randomly[i], "rank_before": ranks[i],
                "rank_after": choice.rank,
            })
            used[i].add(followed)
            if followed == choice.answer_index:
                queries[i], ranks[i] = choice.query, choice.rank
            else:
                queries[i] = append_answer(queries[i], answers[i][followed])
                rerank.append(i)
            still.append(i)
        if rerank:  # the target's rank after the randomly followed answers
            feats = encoder.encode_texts([queries[i] for i in rerank], batch_size)
            for i, rank in zip(rerank, gallery.target_ranks(feats, pids[rerank]).tolist(),
                               strict=True):
                ranks[i] = rank
        active = still
    return plan


def oracle_recall_per_round(plan: pd.DataFrame, n_images: int, rounds: int) -> list[float]:
    """R@1 (%) of the oracle's query after each round over the ``n_images`` look-ahead
    dialogues; stopped dialogues keep their rank."""
    if plan.empty or n_images == 0:
        return []
    plan = plan[~plan["random_history"]]
    first = plan[plan["round"] == 0].set_index("image_idx")["rank_before"]
    current = first.to_dict()
    out = [100.0 * sum(v == 1 for v in current.values()) / n_images]
    for r in range(rounds):
        step = plan[plan["round"] == r]
        if step.empty:
            break
        current.update(step.set_index("image_idx")["rank_after"].to_dict())
        out.append(100.0 * sum(v == 1 for v in current.values()) / n_images)
    return out


def label_gains(steps: pd.DataFrame) -> np.ndarray:
    """How much each step's look-ahead choice helped: ln(rank before) - ln(rank after) (0
    when it kept the target where it was; negative when every usable answer pushed it down).
    An IDK-augmented copy of a dialogue shares its steps' gains."""
    before = steps.rank_before.to_numpy(dtype=np.float64)
    after = steps.rank_after.to_numpy(dtype=np.float64)
    return (np.log(before) - np.log(after)).astype(np.float32)


def build_conversations(rows: pd.DataFrame, plan: pd.DataFrame, pcfg: PrepareSettings,
                        seed: int) -> pd.DataFrame:
    """SFT examples (without pools) from the plan; seeded templates and IDK duplicates."""
    rng = np.random.default_rng([seed, 17])
    by_image = {int(k): g.sort_values("round") for k, g in plan.groupby("image_idx")}
    examples = []
    for row in rows.itertuples():
        steps = by_image.get(int(row.image_idx))
        if steps is None:
            continue
        chosen = steps.answer_index.tolist()
        followed = steps.followed_index.tolist()
        gains = label_gains(steps).tolist()
        questions = [row.questions[j] for j in followed]
        answers = [row.answers[j] for j in followed]
        variants = [(answers, False)]
        if rng.random() < pcfg.idk_duplicate_prob:
            flipped = [IDK if rng.random() < pcfg.idk_answer_prob else a for a in answers]
            variants.append((flipped, True))
        for history_answers, augmented in variants:
            description = row.initial_description
            for r, j in enumerate(chosen):
                examples.append({
                    "image_idx": int(row.image_idx), "pid": int(row.pid), "round": r,
                    "initial_description": row.initial_description,
                    "history_questions": questions[:r],
                    "history_answers": history_answers[:r],
                    "description": description,
                    "target_question": row.questions[j], "target_answer_index": int(j),
                    "template_id": int(rng.integers(NUM_TEMPLATES)),
                    "idk_augmented": augmented, "label_gain": gains[r],
                })
                description = append_answer(description, history_answers[r])
    table = pd.DataFrame(examples)
    table.insert(0, "example_id", np.arange(len(table), dtype=np.int64))
    return table


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def label_folds(rows: pd.DataFrame, galleries: list[str], label_pids: list[set[int]],
                folds: int) -> list[pd.DataFrame]:
    """``rows`` split by the fold gallery their identity is in; every identity in exactly one."""
    if len(galleries) != folds:
        raise ArtifactError(f"prepare.cross_fit is {folds} but {len(galleries)} fold galleries "
                            f"were given ({', '.join(galleries) or 'none'})")
    seen: dict[int, str] = {}
    for path, pids in zip(galleries, label_pids, strict=True):
        for pid in pids:
            if pid in seen:
                raise ArtifactError(f"{path}: identity {pid} is also in fold gallery "
                                    f"{seen[pid]}; the folds must not overlap")
            seen[pid] = path
    missing = sorted(set(rows.pid.tolist()) - set(seen))
    if missing:
        raise ArtifactError(f"no fold gallery holds training identities {missing[:5]} "
                            f"({len(missing)} in all): {', '.join(galleries)}")
    return [rows[rows.pid.isin(pids)] for pids in label_pids]


def run(cfg: dict[str, Any], annotations: str, gallery: str, retriever: str,
        oracle_plan: str, conversations: str, label_retrievers: list[str] | None = None,
        label_galleries: list[str] | None = None) -> None:
    """``label_retrievers``/``label_galleries``: the fold retrievers and their held-out
    training images (cache-features --fold), paired in order, when ``prepare.cross_fit``."""
    settings = typed_view(PrepareConfig, cfg)
    pcfg, seed = settings.prepare, settings.seed
    label_retrievers, label_galleries = label_retrievers or [], label_galleries or []
    if len(label_retrievers) != len(label_galleries):
        raise ArtifactError(f"{len(label_retrievers)} label retrievers but "
                            f"{len(label_galleries)} label galleries: give them in pairs")
    rank, world = _distributed()
    rows = read_annotations(annotations, split="train").reset_index(drop=True)
    encoder = RetrieverEncoder.from_pretrained(retriever, settings.device)
    train_gallery = Gallery.from_parquet(gallery, encoder.device)
    shard = rows.iloc[rank::world]
    log.info("look-ahead over %d training images (%d on this process), up to %d rounds",
             len(rows), len(shard), settings.rounds)
    if pcfg.cross_fit or label_galleries:
        galleries = [Gallery.from_parquet(g, encoder.device) for g in label_galleries]
        parts = label_folds(shard, label_galleries, [set(g.pids.tolist()) for g in galleries],
                            pcfg.cross_fit)
        labellers = list(zip(label_retrievers, galleries, parts, strict=True))
    else:
        labellers = [(retriever, train_gallery, shard)]
    plan = []
    for path, label_gallery, part in labellers:
        log.info("%d images labelled by %s against %d images", len(part), path,
                 len(label_gallery))
        labeller = encoder if path == retriever else RetrieverEncoder.from_pretrained(
            path, settings.device)
        plan += plan_dialogues(labeller, label_gallery, part, settings.rounds,
                               pcfg.min_remaining, pcfg.batch_size, pcfg.random_history, seed)
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, plan)
        plan = [p for part in gathered for p in part]
    if rank != 0:
        return
    plan_df = pd.DataFrame(plan).sort_values(["image_idx", "round"]).reset_index(drop=True)
    lookahead = sum(not follows_random(seed, int(i), pcfg.random_history)
                    for i in rows.image_idx)
    recall = oracle_recall_per_round(plan_df, lookahead, settings.rounds)
    log.info("oracle R@1 per round (initial, after each answer): %s",
             ", ".join(f"{v:.1f}" for v in recall))

    convs = build_conversations(rows, plan_df, pcfg, seed)
    log.info("retrieval pools of %d conversations", len(convs))
    feats = encoder.encode_texts(list(convs.description), pcfg.batch_size)
    top = train_gallery.top_k(feats, settings.pool_size)
    pools = train_gallery.image_idx[top].cpu().numpy()
    convs["pool"] = [p.astype(np.int32) for p in pools]

    tag = config_hash(settings.tag())
    meta = {"retriever": str(retriever), "oracle_r1_per_round": [round(v, 2) for v in recall]}
    if label_retrievers:
        meta["label_retrievers"] = [str(r) for r in label_retrievers]
    write_table(plan_df, oracle_plan, "oracle_plan", config_hash=tag, producer="prepare-data",
                extra_metadata=meta)
    write_table(convs, conversations, "conversations", config_hash=tag,
                producer="prepare-data", extra_metadata=meta)
    log.info("%d plan steps, %d conversations (%d IDK-augmented) -> %s",
             len(plan_df), len(convs), int(convs.idk_augmented.sum()), Path(conversations).parent)
