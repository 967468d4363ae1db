"""Audit of the evaluated dialogues of the synthetic world: what each question asks about, what
its answer says, and how far the answer moves the target.

Two tables from ``eval/{method}/dialogues.parquet``:

- the mismatch rate: of every question asked, the share whose answer states a fact about
  another attribute family than the one the question names ("Was her sweater white, grey or
  blue?" -> "Her hair was blonde."); "I don't know" answers are no mismatch;
- the per-attribute answer gain: the mean log-rank gain of the target per answer,
  ``ln(rank before) - ln(rank after)``, grouped by the attribute family the question asks about.

Families are found by keywords of the synthetic world's vocabulary (``data.attributes``):
measurement only, nothing in the method depends on them. A sentence naming nouns of two
families ("a red cap or a backpack?") is "mixed"; one naming none is "other".

Usage: ``python -m llava_reid.report.answer_audit results/embedded/eval [--out table.tsv]``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from llava_reid.data.attributes import BAG_TYPES, HAT_TYPES, LOWER_TYPES, UPPER_TYPES
from llava_reid.dialogue.query import clean_answer

FAMILIES = ("hair", "upper", "lower", "shoes", "bag", "hat", "glasses")
MIXED, OTHER, IDK_FAMILY = "mixed", "other", "idk"

# Nouns that name one family. Multi-word ones are matched as phrases before single words.
_NOUNS: dict[str, tuple[str, ...]] = {
    "hair": ("hair",),
    "upper": (*UPPER_TYPES, "shirt", "top", "upper body", "coat"),
    "lower": (*LOWER_TYPES, "bottoms", "legs", "lower body", "pants"),
    "shoes": ("shoes", "shoe", "footwear", "sneakers", "boots"),
    "bag": (*(b for b in BAG_TYPES if b != "none"), "bag", "bags"),
    "hat": (*(h for h in HAT_TYPES if h != "none"), "hat", "head", "headwear"),
    "glasses": ("glasses", "eyes", "spectacles", "sunglasses"),
}
# Words that point at a family only when no noun does ("Was he carrying anything?").
_WEAK: dict[str, tuple[str, ...]] = {"bag": ("carry", "carrying", "carried")}


def _pattern(words: Iterable[str]) -> re.Pattern[str]:
    alternatives = sorted({re.escape(w) for w in words}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


_NOUN_RE = {f: _pattern(ws) for f, ws in _NOUNS.items()}
_WEAK_RE = {f: _pattern(ws) for f, ws in _WEAK.items()}
# "long-sleeved shirt" names the upper garment, not hair length; "t-shirt" is one word.
_MASK = re.compile(r"long-sleeved|t-shirt", re.IGNORECASE)


def families_named(sentence: str) -> set[str]:
    """The attribute families whose nouns occur in ``sentence``."""
    found = {f for f, rx in _NOUN_RE.items() if rx.search(sentence)}
    if "upper" not in found and _MASK.search(sentence):
        found.add("upper")
    if not found:
        found = {f for f, rx in _WEAK_RE.items() if rx.search(sentence)}
    return found


def question_family(question: str) -> str:
    """The family a question asks about: one of ``FAMILIES``, "mixed" or "other"."""
    # Multiple-choice options ("A) red B) blue") repeat the listed values; the stem decides.
    stem = re.split(r"\s[A-E]\)\s", question, maxsplit=1)[0]
    found = families_named(stem)
    if len(found) == 1:
        return found.pop()
    return MIXED if found else OTHER


def answer_family(answer: str) -> str:
    """The family an answer states a fact about; "idk" when it adds nothing to the query."""
    cleaned = clean_answer(answer)
    if not cleaned:
        return IDK_FAMILY
    found = families_named(cleaned)
    if len(found) == 1:
        return found.pop()
    return MIXED if found else OTHER


def answered_rounds(dialogues: pd.DataFrame) -> pd.DataFrame:
    """One row per asked question: question, answer, the target's rank before and after."""
    d = dialogues.sort_values(["query_id", "round"])
    after = d[["query_id", "round", "target_rank"]].copy()
    after["round"] -= 1
    after = after.rename(columns={"target_rank": "rank_after"})
    asked = d[d["question"].astype(str).str.len() > 0]
    asked = asked.merge(after, on=["query_id", "round"], how="inner")
    out = asked[["query_id", "round", "question", "answer", "target_rank", "rank_after"]].rename(
        columns={"target_rank": "rank_before"}).reset_index(drop=True)
    out["asked"] = [question_family(q) for q in out["question"]]
    out["answered"] = [answer_family(a) for a in out["answer"]]
    out["gain"] = [math.log(b) - math.log(a)
                   for b, a in zip(out["rank_before"], out["rank_after"], strict=True)]
    return out


def is_mismatch(asked: str, answered: str) -> bool:
    """The answer states a fact, and not about the family the question names."""
    if answered == IDK_FAMILY:
        return False
    return asked != answered


def summary(rounds: pd.DataFrame) -> dict[str, float]:
    n = len(rounds)
    mismatch = [is_mismatch(a, b) for a, b in zip(rounds["asked"], rounds["answered"],
                                                   strict=True)]
    idk = int((rounds["answered"] == IDK_FAMILY).sum())
    return {"questions": n, "idk": idk, "mismatch": int(sum(mismatch)),
            "mismatch_pct": 100.0 * sum(mismatch) / n if n else 0.0,
            "idk_pct": 100.0 * idk / n if n else 0.0,
            "mean_gain": float(rounds["gain"].mean()) if n else 0.0}


def per_family(rounds: pd.DataFrame) -> pd.DataFrame:
    """Per asked family: questions, share answered IDK, mismatches, mean log-rank gain per
    answer (all answers, and the answers that state a fact)."""
    rows = []
    for fam in (*FAMILIES, MIXED, OTHER):
        sub = rounds[rounds["asked"] == fam]
        if sub.empty:
            continue
        facts = sub[sub["answered"] != IDK_FAMILY]
        rows.append({
            "asked": fam, "questions": len(sub),
            "idk_pct": round(100.0 * (len(sub) - len(facts)) / len(sub), 1),
            "mismatch": int(sum(is_mismatch(fam, b) for b in sub["answered"])),
            "gain": round(float(sub["gain"].mean()), 3),
            "gain_answered": round(float(facts["gain"].mean()), 3) if len(facts) else 0.0,
        })
    return pd.DataFrame(rows)


def audit(eval_dir: str | Path, methods: Iterable[str] = ("random", "questioner", "selector",
                                                           "oracle")) -> tuple[pd.DataFrame,
                                                                               pd.DataFrame]:
    """(per-method summary, per-method-and-family table) of the methods found in eval_dir."""
    summaries, tables = [], []
    for method in methods:
        path = Path(eval_dir) / method / "dialogues.parquet"
        if not path.exists():
            continue
        rounds = answered_rounds(pd.read_parquet(path, columns=[
            "query_id", "round", "question", "answer", "target_rank"]))
        summaries.append({"method": method, **summary(rounds)})
        table = per_family(rounds)
        table.insert(0, "method", method)
        tables.append(table)
    if not summaries:
        raise FileNotFoundError(f"no eval/<method>/dialogues.parquet under {eval_dir}")
    return pd.DataFrame(summaries), pd.concat(tables, ignore_index=True)


def candidate_effect(eval_dir: str | Path, method: str = "selector") -> dict[str, int]:
    """How often the selector's candidates differ from the plain top-k of the same round's
    ranking (``top_k``), over every round that asked a question: when they never differ, the
    selector cannot change what the questioner sees."""
    d = pd.read_parquet(Path(eval_dir) / method / "dialogues.parquet",
                        columns=["round", "candidates", "top_k", "question"])
    d = d[d["question"].astype(str).str.len() > 0]
    differ = [list(c) != list(t[: len(c)]) for c, t in zip(d["candidates"], d["top_k"],
                                                           strict=True)]
    first = (d["round"] == 0).tolist()
    return {"rounds": len(d), "candidates_differ": int(sum(differ)),
            "round0": int(sum(first)),
            "round0_candidates_differ": int(sum(x for x, f in zip(differ, first, strict=True)
                                                if f))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", help="the run's eval/ folder")
    parser.add_argument("--methods", nargs="+",
                        default=["random", "questioner", "selector", "oracle"])
    parser.add_argument("--out", help="write the per-family table here (TSV) as well")
    parser.add_argument("--examples", type=int, default=0,
                        help="print this many mismatched question/answer pairs per method")
    args = parser.parse_args(argv)
    overall, table = audit(args.eval_dir, args.methods)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(overall.round(2).to_string(index=False))
        print()
        print(table.to_string(index=False))
    if args.examples:
        for method in args.methods:
            path = Path(args.eval_dir) / method / "dialogues.parquet"
            if not path.exists():
                continue
            rounds = answered_rounds(pd.read_parquet(path))
            bad = rounds[[is_mismatch(a, b) for a, b in zip(rounds["asked"], rounds["answered"],
                                                            strict=True)]]
            print(f"\n{method}: {len(bad)} mismatches")
            for row in bad.head(args.examples).itertuples():
                print(f"  [{row.asked} -> {row.answered}] {row.question!r} -> {row.answer!r}")
    if "selector" in args.methods and (Path(args.eval_dir) / "selector" /
                                       "dialogues.parquet").exists():
        print("\nselector candidates vs plain top-k:", candidate_effect(args.eval_dir))
    if args.out:
        table.to_csv(args.out, sep="\t", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
