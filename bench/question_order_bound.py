"""How far a questioner that knows which questions pay can get, without knowing the answers.

A fixed order of attribute families (say lower garment, shoes, upper garment first) is applied
to every test query's own annotated questions: each round asks the target's next annotated
question in that order (the rest after, in a seeded random order) and appends its annotated
answer to the query, as the evaluation does. The R@1 per round is what a questioner that has
learnt only "which family moves this retriever" could reach with the annotation-grounded
witness; the random-question and look-ahead-oracle rows of the run's report bracket it.

Families come from ``report.answer_audit`` (the synthetic world's vocabulary): measurement
only, nothing in the method uses them.

Usage: ``python bench/question_order_bound.py results/embedded [--order lower,shoes,upper]``
(the run's ``retriever/model``, ``features/test_gallery.parquet``, ``data/annotations.parquet``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llava_reid.dialogue.query import append_answer
from llava_reid.metrics import target_ranks
from llava_reid.report.answer_audit import FAMILIES, question_family
from llava_reid.retriever.encoder import RetrieverEncoder
from llava_reid.retriever.gallery import Gallery


def ordered_answers(questions, answers, order: list[str], rng: np.random.Generator) -> list[str]:
    """The target's annotated answers, in the order the families are asked."""
    families = [question_family(q) for q in questions]
    shuffled = rng.permutation(len(questions)).tolist()
    rank = {f: i for i, f in enumerate(order)}
    shuffled.sort(key=lambda i: rank.get(families[i], len(order)))  # stable: random within
    return [answers[i] for i in shuffled]


def r1_per_round(run: Path, order: list[str], rounds: int, seed: int) -> list[float]:
    encoder = RetrieverEncoder.from_pretrained(run / "retriever" / "model", device="cpu")
    gallery = Gallery.from_parquet(str(run / "features" / "test_gallery.parquet"))
    records = pd.read_parquet(run / "data" / "annotations.parquet")
    test = records[records.split == "test"]
    rng = np.random.default_rng(seed)
    plans = [ordered_answers(r.questions, r.answers, order, rng) for r in test.itertuples()]
    out = []
    for k in range(rounds + 1):
        queries = []
        for r, plan in zip(test.itertuples(), plans, strict=True):
            query = r.initial_description
            for answer in plan[:k]:
                query = append_answer(query, answer)
            queries.append(query)
        feats = encoder.encode_texts(queries)
        ranks = target_ranks(feats @ gallery.feats.T, torch.as_tensor(test.pid.to_numpy()),
                             gallery.pids)
        out.append(100.0 * float((ranks == 1).mean()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished run's results folder")
    ap.add_argument("--order", action="append",
                    help="comma-separated families asked first (repeatable); default: a few")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    orders = args.order or ["lower,shoes,upper", "lower,shoes,upper,glasses",
                            "lower,shoes,upper,hair", "hair,bag,hat,glasses"]
    print("order\t" + "\t".join(f"R@1 after {k}" for k in range(args.rounds + 1)))
    for text in orders:
        order = text.split(",")
        unknown = set(order) - set(FAMILIES)
        if unknown:
            raise SystemExit(f"unknown families {sorted(unknown)}; expected some of {FAMILIES}")
        r1 = r1_per_round(args.run, order, args.rounds, args.seed)
        print(text + "\t" + "\t".join(f"{x:.2f}" for x in r1))


if __name__ == "__main__":
    main()
