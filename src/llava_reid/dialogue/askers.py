"""Who asks the question each round: the methods that evaluation compares.

An asker sees one round of a batch of dialogues (their query features and retrieval pools) and
returns, per dialogue, the question, the candidate images shown to the questioner (if any) and,
when it knows it already, the answer.

- ``InitialOnly``: no questions (the initial-query baseline);
- ``RandomAnnotated``: a seeded random annotated question of the target not asked yet;
- ``LookAheadOracle``: the annotated answer that ranks the target highest (upper bound);
- ``QuestionerAsker``: the trained questioner shown the top-1 and either the plain top-k or the
  selector's choice from the round's pool (its first k_r positions open:
  ``selector.sampler.valid_length``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from llava_reid.dialogue.oracle import best_next_answers
from llava_reid.dialogue.repeats import (
    REPEAT_OVERLAP,
    asks_what_was_said,
    names_one_item,
    overlap,
    repeat_score,
)
from llava_reid.questioner.prompts import NUM_TEMPLATES, build_prompt
from llava_reid.retriever.gallery import Gallery
from llava_reid.training import derived_seed


@dataclass
class Dialogue:
    """One query's dialogue state; the target is ``image_idx`` (None: the query's own image,
    query id = image_idx)."""

    query_id: int
    pid: int
    initial: str
    memory: str  # the witness's fine-grained description
    annotated_questions: tuple[str, ...]
    annotated_answers: tuple[str, ...]
    query: str = ""  # the retriever query so far
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    asked: set[int] = field(default_factory=set)  # annotated Q/A used (random, oracle)
    image_idx: int | None = None

    def __post_init__(self):
        self.query = self.query or self.initial
        if self.image_idx is None:
            self.image_idx = self.query_id


@dataclass
class Asked:
    question: str
    candidates: list[int] = field(default_factory=list)  # image_idx shown, rank order
    seen: list[int] = field(default_factory=list)  # image_idx spliced into the prompt
    answer: str | None = None  # known without the answerer (oracle); else asked
    annotated_index: int = -1


@dataclass
class RoundContext:
    round: int
    dialogues: list[Dialogue]
    query_feats: torch.Tensor  # [B, D] L2-normalised
    pools: torch.Tensor  # [B, P] gallery rows, best first
    target_ranks: list[int]


class InitialOnly:
    name = "initial"
    label = "Initial query only"
    asks_witness = False  # every Asked carries its answer

    def ask(self, ctx: RoundContext) -> list[Asked]:
        return [Asked("", answer="") for _ in ctx.dialogues]


class RandomAnnotated:
    name = "random"
    label = "Random annotated question"
    asks_witness = True

    def __init__(self, seed: int):
        self.seed = seed

    def ask(self, ctx: RoundContext) -> list[Asked]:
        out = []
        for d in ctx.dialogues:
            left = [j for j in range(len(d.annotated_questions)) if j not in d.asked]
            if not left:
                out.append(Asked("", answer=""))
                continue
            rng = np.random.default_rng(derived_seed(self.seed, d.query_id, ctx.round, 3))
            j = int(left[int(rng.integers(len(left)))])
            out.append(Asked(d.annotated_questions[j], annotated_index=j))
        return out


class LookAheadOracle:
    name = "oracle"
    label = "Look-ahead oracle (upper bound)"
    asks_witness = False  # answers with the annotation it chose

    def __init__(self, encoder, gallery: Gallery, batch_size: int):
        self.encoder, self.gallery, self.batch_size = encoder, gallery, batch_size

    def ask(self, ctx: RoundContext) -> list[Asked]:
        ds = ctx.dialogues
        choices = best_next_answers(
            self.encoder, self.gallery, [d.query for d in ds],
            [d.annotated_answers for d in ds], [d.asked for d in ds],
            torch.tensor([d.pid for d in ds]), ctx.target_ranks, min_remaining=1,
            batch_size=self.batch_size,
        )
        out = []
        for d, c in zip(ds, choices, strict=True):
            if c.answer_index < 0:
                out.append(Asked("", answer=""))
            else:
                j = c.answer_index
                out.append(Asked(d.annotated_questions[j], answer=d.annotated_answers[j],
                                 annotated_index=j))
        return out


def template_for(seed: int, query_id: int, round_: int) -> int:
    return derived_seed(seed, query_id, round_, 1) % NUM_TEMPLATES


class QuestionerAsker:
    """The trained questioner; candidates from plain top-k or from the selector."""

    REDRAWS = 8
    asks_witness = True

    def __init__(self, questioner, visual_cache, gallery: Gallery, generation, seed: int,
                 pool_size: int, num_candidates: int, batch_size: int, selector=None,
                 votes: int = 1):
        from llava_reid.questioner.generate import PrefixCache

        self.q, self.cache, self.gallery = questioner, visual_cache, gallery
        self.generation, self.seed = generation, seed
        self.pool_size, self.num_candidates = pool_size, num_candidates
        self.batch_size, self.selector, self.votes = batch_size, selector, votes
        self.prefix_cache = PrefixCache(questioner)
        self.name = "selector" if selector is not None else "questioner"
        self.label = ("Questioner + selector" if selector is not None
                      else "Questioner, plain top-k candidates")

    @torch.no_grad()
    def candidate_rows(self, ctx: RoundContext) -> list[list[int]]:
        """Gallery rows shown per dialogue: the top-1, then ``num_candidates - 1`` more."""
        from llava_reid.selector.sampler import (
            candidate_positions,
            selectable_mask,
            topk_positions,
        )

        pools = ctx.pools
        if self.selector is None or pools.shape[1] < 2:
            return pools[:, : self.num_candidates].tolist()
        rounds = torch.full((len(pools),), ctx.round, device=pools.device)
        valid = selectable_mask(rounds, self.pool_size, pools.shape[1])
        device = next(self.selector.parameters()).device
        feats = self.gallery.feats[pools[:, 1:]].to(device)
        scores = self.selector(ctx.query_feats.to(device), feats, valid.to(device))
        positions = candidate_positions(topk_positions(scores, self.num_candidates - 1)).cpu()
        rows = []
        for pool, pos in zip(pools.cpu().tolist(), positions.tolist(), strict=True):
            rows.append([pool[p] for p in pos if p >= 0])
        return rows

    def ask(self, ctx: RoundContext) -> list[Asked]:
        from llava_reid.questioner.generate import generate_questions

        rows = self.candidate_rows(ctx)
        image_ids = [[int(self.gallery.image_idx[r]) for r in rr] for rr in rows]
        prompts = [
            build_prompt(template_for(self.seed, d.query_id, ctx.round), len(ids), d.initial,
                         d.questions, d.answers)
            for d, ids in zip(ctx.dialogues, image_ids, strict=True)
        ]
        seeds = [derived_seed(self.seed, d.query_id, ctx.round, 2) for d in ctx.dialogues]
        result = generate_questions(self.q, prompts, image_ids, self.cache.tokens, seeds,
                                    self.generation, self.prefix_cache, self.batch_size,
                                    samples=self.votes)
        questions = [self.consensus(d, drawn) for d, drawn in zip(ctx.dialogues,
                                                                   result.samples, strict=True)]
        questions = self.avoid_repeats(ctx, prompts, image_ids, questions)
        return [Asked(text, candidates=ids, seen=seen)
                for text, ids, seen in zip(questions, image_ids, result.seen, strict=True)]

    def consensus(self, d: Dialogue, samples: list[str]) -> str:
        """The question most of the samples ask. Sampling token by token favours the single
        likeliest wording ("What colour were her shoes?") over a topic whose probability is
        spread over many wordings ("Were her jeans red?", "What colour were her jeans?",
        ...); counting, for each sample, how many samples ask the same thing
        (``repeats.overlap``) finds the topic the questioner puts most probability on.
        Samples asking what the dialogue already asked or the witness said do not vote; with
        no other sample the first stays (``avoid_repeats`` redraws it). Ties: the earlier
        sample."""
        open_ = [s for s in samples if self.waste(s, d) < REPEAT_OVERLAP]
        if not open_:
            return samples[0]
        support = [sum(overlap(s, t) >= REPEAT_OVERLAP for t in open_) for s in open_]
        return open_[support.index(max(support))]

    @staticmethod
    def waste(question: str, d: Dialogue) -> float:
        """How much ``question`` would waste the round (``dialogue.repeats``): its overlap
        with an earlier question, or 1.0 when the witness has already said what it asks or
        when it is garbled (names no item or several)."""
        if not names_one_item(question) or asks_what_was_said(question, [d.initial, *d.answers]):
            return 1.0
        return repeat_score(question, d.questions)

    def avoid_repeats(self, ctx: RoundContext, prompts, image_ids, questions: list[str]
                      ) -> list[str]:
        """A question about what the dialogue already asked or the witness already said
        (``dialogue.repeats``) wastes the round: redraw it with a wider nucleus, a little
        hotter each time, up to ``REDRAWS`` times; keep the first draw that is no repeat, else
        the least repeating one."""
        from llava_reid.questioner.generate import generate_questions

        questions = list(questions)
        scores = [self.waste(q, d) for d, q in zip(ctx.dialogues, questions, strict=True)]
        for attempt in range(1, self.REDRAWS + 1):
            todo = [i for i, score in enumerate(scores) if score >= REPEAT_OVERLAP]
            if not todo:
                break
            cfg = replace(self.generation, do_sample=True, top_p=0.9,
                          temperature=self.generation.temperature * (1 + 0.125 * attempt))
            seeds = [derived_seed(self.seed, ctx.dialogues[i].query_id, ctx.round, 2, attempt)
                     for i in todo]
            redrawn = generate_questions(self.q, [prompts[i] for i in todo],
                                         [image_ids[i] for i in todo], self.cache.tokens,
                                         seeds, cfg, self.prefix_cache, self.batch_size)
            for i, text in zip(todo, redrawn.questions, strict=True):
                score = self.waste(text, ctx.dialogues[i])
                if score < scores[i]:
                    questions[i], scores[i] = text, score
        return questions
