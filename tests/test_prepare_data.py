"""prepare-data's look-ahead plan: labels, followed histories, SFT conversations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from llava_reid.dialogue.prepare_data import (
    PrepareSettings,
    build_conversations,
    label_gains,
    oracle_recall_per_round,
    plan_dialogues,
)
from llava_reid.retriever.gallery import Gallery
from tests.conftest import base_config

WORDS = ["red", "blue", "shoes", "bag", "hat", "glasses", "jeans", "skirt"]


class BagOfWords:
    """A stand-in retriever: a text's feature counts the attribute words it contains."""

    def encode_texts(self, texts, batch_size):
        feats = torch.tensor([[t.lower().count(w) for w in WORDS] for t in texts],
                             dtype=torch.float32) + 0.01
        return torch.nn.functional.normalize(feats, dim=-1)


def _gallery() -> Gallery:
    people = [["red", "shoes", "bag", "jeans"], ["red", "shoes", "hat", "skirt"],
              ["blue", "shoes", "bag", "jeans"], ["red", "glasses", "bag", "jeans"]]
    feats = torch.tensor([[float(w in p) for w in WORDS] for p in people]) + 0.01
    return Gallery(torch.nn.functional.normalize(feats, dim=-1), torch.arange(4),
                   torch.arange(100, 104), [f"{i}.png" for i in range(4)])


def _rows() -> pd.DataFrame:
    questions = ["What colour were her shoes?", "Did she carry a bag?", "Did she wear a hat?",
                 "What did she wear on her legs?", "Did she wear glasses?"]
    answers = ["Her shoes were red.", "She carried a bag.", "No hat.", "She wore jeans.",
               "No glasses."]
    return pd.DataFrame({"image_idx": [100, 102, 103], "pid": [0, 2, 3],
                         "initial_description": ["I saw a woman.", "A man in blue.",
                                                 "A woman in red."],
                         "questions": [questions] * 3, "answers": [answers] * 3})


def _plan(random_history: float) -> pd.DataFrame:
    plan = plan_dialogues(BagOfWords(), _gallery(), _rows(), rounds=3, min_remaining=1,
                          batch_size=8, random_history=random_history, seed=5)
    return pd.DataFrame(plan).sort_values(["image_idx", "round"]).reset_index(drop=True)


def test_lookahead_dialogues_go_on_with_the_chosen_answer():
    plan = _plan(0.0)
    assert len(plan) == 9 and not plan.random_history.any()
    assert (plan.followed_index == plan.answer_index).all()
    # The first choice for the woman in red shoes/jeans is a fact that separates her.
    first = plan[(plan.image_idx == 100) & (plan["round"] == 0)].iloc[0]
    assert first.rank_after <= first.rank_before
    recall = oracle_recall_per_round(plan, 3, 3)
    # Two of the three targets start first; every dialogue ends with its target first.
    assert plan[plan["round"] == 0].rank_before.tolist() == [1, 1, 3]
    assert recall[0] == pytest.approx(200 / 3) and recall[-1] == 100.0


def test_random_histories_keep_lookahead_targets_and_never_reuse_answers():
    plan = _plan(1.0)
    assert plan.random_history.all()
    assert (plan.followed_index != plan.answer_index).any()  # some steps leave the oracle
    for _, steps in plan.groupby("image_idx"):
        followed = steps.followed_index.tolist()
        assert len(set(followed)) == len(followed)
        for r, label in enumerate(steps.answer_index):
            assert label not in followed[:r]  # the target is never an answer already given
    assert _plan(1.0).equals(plan)  # seeded
    assert oracle_recall_per_round(plan, 0, 3) == []  # no look-ahead dialogue to report

    rows = _rows()
    settings = PrepareSettings(**{**base_config()["prepare"], "idk_duplicate_prob": 0.0,
                                  "idk_answer_prob": 0.0})
    convs = build_conversations(rows, plan, settings, seed=5)
    answers, questions = rows.answers[0], rows.questions[0]
    for conv in convs.itertuples():
        steps = plan[plan.image_idx == conv.image_idx].reset_index(drop=True)
        followed = steps.followed_index.tolist()[: conv.round]
        assert list(conv.history_answers) == [answers[j] for j in followed]
        assert list(conv.history_questions) == [questions[j] for j in followed]
        assert conv.target_question == questions[steps.answer_index[conv.round]]
        step = steps.iloc[conv.round]  # the label's gain: ln rank before - ln rank after
        assert conv.label_gain == pytest.approx(np.log(step.rank_before / step.rank_after))


def test_label_gain_is_the_log_rank_gain_of_the_lookahead_choice():
    steps = pd.DataFrame({"rank_before": [40, 3, 1, 1], "rank_after": [3, 1, 1, 2]})
    gains = label_gains(steps)
    assert gains.dtype == np.float32
    assert gains.tolist() == pytest.approx([np.log(40 / 3), np.log(3), 0.0, -np.log(2)])


def test_lookahead_breaks_rank_ties_by_the_target_margin():
    """Both answers keep the target first; the one that separates it more wins, not the
    first annotated one (ties by annotation order made one question the label of most late
    rounds)."""
    from llava_reid.dialogue.oracle import best_next_answers

    people = [["red", "shoes"], ["blue", "hat"]]
    feats = torch.tensor([[float(w in p) for w in WORDS] for p in people]) + 0.01
    gallery = Gallery(torch.nn.functional.normalize(feats, dim=-1), torch.arange(2),
                      torch.arange(2), ["a.png", "b.png"])
    answers = ["It was red.", "Her shoes were red."]
    (choice,) = best_next_answers(BagOfWords(), gallery, ["I saw someone in red."], [answers],
                                  [set()], torch.tensor([0]), [1], min_remaining=1)
    assert choice.rank == 1 and choice.answer_index == 1
    ranks, margins = gallery.target_ranks_and_margins(BagOfWords().encode_texts(answers, 2),
                                                      torch.tensor([0, 0]))
    assert ranks.tolist() == [1, 1]
    assert margins[1] > margins[0] > 0
