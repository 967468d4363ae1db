"""The dialogue engine: all active dialogues advance one round together.

Each round, for the whole batch: encode the queries with the retriever text encoder (one
batched pass), rank them against the cached gallery features, take each query's top-N pool,
let the asker produce the questions (the questioner generates for the whole batch at once),
get the missing answers from the answerer in one concurrent batch, append each cleaned answer
to its query (prefixes such as "Yes, " removed, "I don't know" ignored) and record the round.

Rows: one per dialogue and round r = 0..R. Row r holds the ranking of the query after r
answers, and (for r < R) the question asked next, its answer and the images the questioner saw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from llava_reid.answerer import AnswerRequest
from llava_reid.dialogue.askers import Asked, Dialogue, RoundContext
from llava_reid.dialogue.query import append_answer
from llava_reid.retriever.gallery import Gallery

log = logging.getLogger(__name__)

TOP_K_RECORDED = 10
UNKNOWN_TARGET = -1  # pid of a dialogue whose target is not known (a person's own search)


class DialogueEngine:
    def __init__(self, encoder, gallery: Gallery, asker, answerer, rounds: int, pool_size: int,
                 text_batch_size: int = 256, auxiliary=None):
        self.encoder, self.gallery = encoder, gallery
        self.asker, self.answerer = asker, answerer
        self.rounds, self.pool_size = rounds, pool_size
        self.text_batch_size = text_batch_size
        self.auxiliary = auxiliary  # llava_reid.dialogue.fusion.AuxiliarySimilarity or None

    def rank(self, dialogues: Sequence[Dialogue]):
        feats = self.encoder.encode_texts([d.query for d in dialogues], self.text_batch_size)
        pids = torch.tensor([d.pid for d in dialogues])
        if self.auxiliary is not None:  # an external retriever's scores fused in
            ranks, pools = self.auxiliary.rank(self.gallery, feats, [d.query_id for d in dialogues],
                                               pids, max(self.pool_size, TOP_K_RECORDED))
            return feats, ranks, pools
        known = pids != UNKNOWN_TARGET
        if known.all():
            ranks = self.gallery.target_ranks(feats, pids).tolist()
        else:  # a person's own search has no target to rank
            ranks = torch.full((len(pids),), UNKNOWN_TARGET, dtype=torch.long)
            if known.any():
                ranks[known] = self.gallery.target_ranks(feats[known.to(feats.device)],
                                                         pids[known])
            ranks = ranks.tolist()
        pools = self.gallery.top_k(feats, max(self.pool_size, TOP_K_RECORDED))
        return feats, ranks, pools

    def answer(self, dialogues: Sequence[Dialogue], asked: list[Asked], round_: int) -> list[str]:
        """Answers for the questions the asker did not answer itself, in one batch."""
        todo = [i for i, a in enumerate(asked) if a.answer is None]
        requests = [
            AnswerRequest(
                request_id=f"{dialogues[i].query_id}:{round_}",
                target_id=dialogues[i].image_idx,
                question=asked[i].question,
                memory=dialogues[i].memory,
                annotated_questions=dialogues[i].annotated_questions,
                annotated_answers=dialogues[i].annotated_answers,
            )
            for i in todo
        ]
        if requests and self.answerer is None:
            raise RuntimeError(f"{type(self.asker).__name__} left {len(requests)} questions "
                               "unanswered but the dialogue has no answerer")
        got = self.answerer.answer(requests) if requests else []
        answers = [a.answer for a in asked]
        for i, text in zip(todo, got, strict=True):
            answers[i] = text
        return [a or "" for a in answers]

    def run(
        self,
        dialogues: list[Dialogue],
        start_round: int = 0,
        on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Advance ``dialogues`` from ``start_round`` to the end; returns the new rows.
        ``on_round(r, rows_of_round_r)`` runs after each completed round (checkpointing)."""
        rows: list[dict[str, Any]] = []
        for r in range(start_round, self.rounds + 1):
            if not dialogues:
                break
            feats, ranks, pools = self.rank(dialogues)
            top = self.gallery.image_idx[pools[:, :TOP_K_RECORDED]].cpu().numpy()
            round_rows = [
                {"query_id": d.query_id, "pid": d.pid, "round": r, "query": d.query,
                 "target_rank": int(rank), "top_k": top[i].astype(np.int32),
                 "candidates": [], "seen_images": [], "question": "", "answer": "",
                 "query_feat": feats[i].float().cpu().numpy()}
                for i, (d, rank) in enumerate(zip(dialogues, ranks, strict=True))
            ]
            if r < self.rounds:
                ctx = RoundContext(r, dialogues, feats, pools[:, : self.pool_size], ranks)
                asked = self.asker.ask(ctx)
                answers = self.answer(dialogues, asked, r)
                for d, a, answer, row in zip(dialogues, asked, answers, round_rows, strict=True):
                    row.update(candidates=a.candidates, seen_images=a.seen,
                               question=a.question, answer=answer)
                    advance(d, a.question, answer, a.annotated_index)
            rows += round_rows
            if on_round is not None:
                on_round(r, round_rows)
            log.info("round %d: R@1 %.1f%%, median target rank %d (%d dialogues)", r,
                     100.0 * float(np.mean(np.asarray(ranks) == 1)), int(np.median(ranks)),
                     len(dialogues))
        return rows


def advance(d: Dialogue, question: str, answer: str, annotated_index: int = -1) -> None:
    """Apply one round's question and answer to a dialogue's state."""
    if annotated_index >= 0:
        d.asked.add(annotated_index)
    if question:
        d.questions.append(question)
        d.answers.append(answer)
        d.query = append_answer(d.query, answer)
