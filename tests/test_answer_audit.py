"""The dialogue audit: attribute families of questions and answers, the mismatch count and the
per-family log-rank gain, on the synthetic world's own phrasings and on a small dialogue table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from llava_reid.data.attributes import SLOTS, question_answer, sample_person
from llava_reid.report.answer_audit import (
    IDK_FAMILY,
    answer_family,
    answered_rounds,
    audit,
    per_family,
    question_family,
    summary,
)

FAMILY_OF_SLOT = {"hair_colour": "hair", "hair_length": "hair", "upper_type": "upper",
                  "upper_colour": "upper", "lower_type": "lower", "lower_colour": "lower",
                  "shoes": "shoes", "bag": "bag", "hat": "hat", "glasses": "glasses"}


def test_every_generator_phrasing_gets_its_family():
    rng = np.random.default_rng(0)
    for _ in range(300):
        person = sample_person(rng)
        for slot in SLOTS:
            _, question, answer = question_answer(person, slot, rng)
            assert question_family(question) == FAMILY_OF_SLOT[slot], question
            assert answer_family(answer) == FAMILY_OF_SLOT[slot], answer


@pytest.mark.parametrize(("question", "family"), [
    ("Was her sweater white, grey or blue? A) white B) grey C) blue", "upper"),
    ("Was she carrying anything on her head?", "hat"),  # the head names the item
    ("Was he carrying anything?", "bag"),
    ("Was she wearing a long-sleeved shirt?", "upper"),  # not hair length
    ("Was her cap red or was it her backpack?", "mixed"),
    ("Where did you see her?", "other"),
])
def test_question_families(question, family):
    assert question_family(question) == family


def test_answer_families():
    assert answer_family("I don't know.") == IDK_FAMILY
    assert answer_family("Her hair was blonde.") == "hair"
    assert answer_family("No, she did not carry a bag.") == "bag"
    assert answer_family("B) His jeans were grey.") == "lower"


def dialogues() -> pd.DataFrame:
    rows = [  # query 0: a mismatch, then an IDK; query 1: a matching answer
        (0, 0, "Was her sweater white, grey or blue?", "Her hair was blonde.", 8),
        (0, 1, "Was she wearing a hat?", "I don't know.", 4),
        (0, 2, "", "", 4),
        (1, 0, "What colour were his shoes?", "His shoes were white.", 10),
        (1, 1, "", "", 1),
    ]
    return pd.DataFrame(rows, columns=["query_id", "round", "question", "answer", "target_rank"])


def test_mismatch_and_gain_tables(tmp_path):
    rounds = answered_rounds(dialogues())
    assert list(rounds["asked"]) == ["upper", "hat", "shoes"]
    assert list(rounds["answered"]) == ["hair", IDK_FAMILY, "shoes"]
    assert rounds["gain"].tolist() == pytest.approx([math.log(2), 0.0, math.log(10)])
    s = summary(rounds)
    assert (s["questions"], s["mismatch"], s["idk"]) == (3, 1, 1)
    assert s["mismatch_pct"] == pytest.approx(100 / 3)
    table = per_family(rounds).set_index("asked")
    assert table.loc["shoes", "gain"] == pytest.approx(round(math.log(10), 3))
    assert table.loc["hat", "idk_pct"] == 100.0 and table.loc["upper", "mismatch"] == 1
    (tmp_path / "random").mkdir()
    dialogues().to_parquet(tmp_path / "random" / "dialogues.parquet")
    overall, by_family = audit(tmp_path)
    assert overall["method"].tolist() == ["random"] and len(by_family) == 3
    with pytest.raises(FileNotFoundError, match="dialogues.parquet"):
        audit(tmp_path / "nothing")


def test_candidate_effect_counts_rounds_where_the_selector_leaves_the_top_k(tmp_path):
    from llava_reid.report.answer_audit import candidate_effect

    rows = [(0, [1, 2], [1, 2, 3], "hat?"), (1, [1, 3], [1, 2, 3], "bag?"),
            (0, [5, 6], [5, 6, 7], "hair?"), (2, [], [5, 6, 7], "")]  # last round: no question
    (tmp_path / "selector").mkdir()
    pd.DataFrame(rows, columns=["round", "candidates", "top_k", "question"]).to_parquet(
        tmp_path / "selector" / "dialogues.parquet")
    assert candidate_effect(tmp_path) == {"rounds": 3, "candidates_differ": 1, "round0": 2,
                                          "round0_candidates_differ": 0}
