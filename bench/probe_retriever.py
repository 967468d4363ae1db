"""What a trained retriever of the synthetic world sees: linear probes and answer gains.

For each attribute the renderer drew (``drawn.json``), a logistic-regression probe is fit on
the retriever's image features of the training split and scored on the test split (beside the
majority class's share); the same on the text features of the fine-grained descriptions. Then,
on the test split, the mean log-rank gain of the target when each annotated answer is appended
to the initial description, by the attribute family its question asks about, and the R@1 of a
query that gives only the hair, bag, hat and glasses.

An attribute the image probe cannot predict above the majority is invisible to the retriever:
no answer about it can move the target, whatever the questioner asks.

Usage: ``python bench/probe_retriever.py results/embedded [--split-size 400]``
(the run's ``retriever/model`` and ``data/synthetic``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llava_reid.data import attributes as A
from llava_reid.dialogue.query import append_answer
from llava_reid.metrics import target_ranks
from llava_reid.report.answer_audit import FAMILIES, question_family
from llava_reid.retriever.encoder import RetrieverEncoder

PROBED = ("gender", "hair_colour", "hair_length", "upper_type", "upper_colour", "lower_type",
          "lower_colour", "shoes", "bag", "bag_colour", "hat", "glasses")
ACCESSORY_SLOTS = ("hair_colour", "hair_length", "bag", "hat", "glasses")


def probe_accuracy(train: torch.Tensor, train_y: list[str], test: torch.Tensor,
                   test_y: list[str]) -> float:
    """Test accuracy of an L2-regularised linear classifier fit with L-BFGS."""
    classes = sorted(set(train_y))
    y = torch.tensor([classes.index(v) for v in train_y])
    y_test = torch.tensor([classes.index(v) if v in classes else -1 for v in test_y])
    w = torch.zeros(train.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train @ w * 10 + b, y) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((test @ w * 10 + b).argmax(1) == y_test).float().mean())


def query_ranks(encoder: RetrieverEncoder, gallery: torch.Tensor, gallery_pids: torch.Tensor,
                texts: list[str], pids: list[int]) -> torch.Tensor:
    """1-based rank of the first gallery image of each text's identity (the evaluation's)."""
    feats, _ = encoder.encode_texts_once(texts)
    return torch.from_numpy(target_ranks(feats @ gallery.T, torch.tensor(pids), gallery_pids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run's results folder, e.g. results/embedded")
    ap.add_argument("--split-size", type=int, default=0, help="records per split (0: all)")
    args = ap.parse_args()
    data = args.run / "data" / "synthetic"
    records = json.loads((data / "annotations.json").read_text())
    drawn = json.loads((data / "images" / "drawn.json").read_text())
    encoder = RetrieverEncoder.from_pretrained(args.run / "retriever" / "model", device="cpu")

    def split(name: str) -> list[dict]:
        rows = [r for r in records if r["split"] == name]
        return rows[: args.split_size] if args.split_size else rows

    def person(record: dict) -> dict:
        return drawn[str(Path(record["file_path"]).relative_to("images"))]

    train, test = split("train"), split("test")
    # clone(): the encoders return inference-mode tensors, which the probes cannot train on.
    images = {n: encoder.encode_images([data / r["file_path"] for r in rs]).clone()
              for n, rs in (("train", train), ("test", test))}
    texts = {n: encoder.encode_texts([r["fine-grained_description"] for r in rs]).clone()
             for n, rs in (("train", train), ("test", test))}
    print("attribute      image probe  text probe  majority   (test accuracy, %)")
    for attr in PROBED:
        y_train = [str(person(r)[attr]) for r in train]
        y_test = [str(person(r)[attr]) for r in test]
        majority = max(y_test.count(v) for v in set(y_test)) / len(y_test)
        acc_image = probe_accuracy(images["train"], y_train, images["test"], y_test)
        acc_text = probe_accuracy(texts["train"], y_train, texts["test"], y_test)
        print(f"{attr:14s} {100 * acc_image:11.1f} {100 * acc_text:11.1f} {100 * majority:9.1f}")

    gallery, pids = images["test"], torch.tensor([r["id"] for r in test])
    base = query_ranks(encoder, gallery, pids, [r["initial_description"] for r in test],
                        [r["id"] for r in test])
    queries, owners, families = [], [], []
    for i, r in enumerate(test):
        for q, a in zip(r["questions"], r["answers"], strict=True):
            queries.append(append_answer(r["initial_description"], a))
            owners.append(i)
            families.append(question_family(q))
    after = query_ranks(encoder, gallery, pids, queries, [test[i]["id"] for i in owners])
    gains = [math.log(base[i]) - math.log(a) for i, a in zip(owners, after.tolist(), strict=True)]
    print(f"\ninitial query R@1 {100 * float((base == 1).float().mean()):.2f}")
    print("answer family  answers  mean log-rank gain")
    for fam in FAMILIES:
        g = [x for x, f in zip(gains, families, strict=True) if f == fam]
        if g:
            print(f"{fam:14s} {len(g):7d} {sum(g) / len(g):+19.3f}")
    accessory = [" ".join([f"I saw {A._a(person(r)['gender'])}.",
                           *(A.statement(A.Person(**person(r)), s) for s in ACCESSORY_SLOTS)])
                 for r in test]
    ranks = query_ranks(encoder, gallery, pids, accessory, [r["id"] for r in test])
    chance = 100.0 / len({r["id"] for r in test})
    print(f"\nhair/bag/hat/glasses-only query R@1 {100 * float((ranks == 1).float().mean()):.2f}"
          f" (one identity at random: {chance:.2f})")


if __name__ == "__main__":
    main()
