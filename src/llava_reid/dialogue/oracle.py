"""The look-ahead oracle: which of the target's annotated answers helps retrieval most.

Given a dialogue's current query and the answers it has not used yet, append each candidate
answer (cleaned as in the query update), re-encode all candidate queries of all dialogues in
one batched pass, rank each against the gallery, and keep the answer that puts the target
highest; among answers that give the same rank, the one that widens the target's similarity
margin over the best other identity most. (Ties are common once the target ranks first;
breaking them by annotation order made "the first annotated question" the label of most late
rounds, and a questioner trained on those labels asked it again and again.) prepare_data uses
it to label which question the questioner should have asked; the evaluation's "oracle"
baseline uses it as an upper bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava_reid.dialogue.query import append_answer, clean_answer
from llava_reid.retriever.gallery import Gallery


@dataclass
class Choice:
    answer_index: int  # -1 when fewer than ``min_remaining`` usable answers were left
    rank: int  # target rank after appending the chosen answer (before, when none chosen)
    query: str  # the query after appending it


def usable_answers(query: str, answers: Sequence[str], used: set[int]) -> list[int]:
    """Answers not used yet whose cleaned text adds something to the query."""
    out = []
    for j, answer in enumerate(answers):
        cleaned = clean_answer(answer)
        if j not in used and cleaned and cleaned.lower() not in query.lower():
            out.append(j)
    return out


@torch.inference_mode()
def best_next_answers(
    encoder,
    gallery: Gallery,
    queries: Sequence[str],
    answers: Sequence[Sequence[str]],
    used: Sequence[set[int]],
    target_pids: torch.Tensor,
    current_ranks: Sequence[int],
    min_remaining: int = 2,
    batch_size: int = 512,
) -> list[Choice]:
    """One look-ahead step for a batch of dialogues (see module docstring)."""
    pairs: list[tuple[int, int]] = []
    texts: list[str] = []
    for i, (query, options) in enumerate(zip(queries, answers, strict=True)):
        usable = usable_answers(query, options, used[i])
        if len(usable) < min_remaining:
            continue
        for j in usable:
            pairs.append((i, j))
            texts.append(append_answer(query, options[j]))
    choices = [Choice(-1, int(r), q) for q, r in zip(queries, current_ranks, strict=True)]
    if not pairs:
        return choices
    feats = encoder.encode_texts(texts, batch_size)
    pair_pids = target_pids[torch.tensor([i for i, _ in pairs])]
    ranks, margins = (t.tolist() for t in gallery.target_ranks_and_margins(feats, pair_pids))
    best: dict[int, tuple[int, int, float, str]] = {}
    for (i, j), rank, margin, text in zip(pairs, ranks, margins, texts, strict=True):
        # Strictly better only: on a full tie the first annotated answer wins.
        if i not in best or (rank, -margin) < (best[i][1], -best[i][2]):
            best[i] = (j, rank, margin, text)
    for i, (j, rank, _, text) in best.items():
        choices[i] = Choice(j, rank, text)
    return choices
