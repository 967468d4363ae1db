"""Evaluation plumbing: balanced chunks, resume replay, merge checks, askers, the launcher."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from llava_reid.artifacts import ArtifactError, write_table
from llava_reid.cli import _relaunch_distributed
from llava_reid.dialogue.askers import (
    Dialogue,
    QuestionerAsker,
    RandomAnnotated,
    RoundContext,
    template_for,
)
from llava_reid.dialogue.engine import advance
from llava_reid.dialogue.evaluate import chunk_ids, restore, rows_table
from llava_reid.dialogue.merge import merge_chunks
from llava_reid.dialogue.query import append_answer, clean_answer
from llava_reid.dialogue.repeats import (
    asks_what_was_said,
    content_words,
    is_repeat,
    names_one_item,
    overlap,
    stated_facts,
)
from llava_reid.questioner.generate import GenerationConfig, GenerationResult


@pytest.mark.parametrize("count", [1, 2, 3, 7, 12])
def test_chunks_are_balanced_disjoint_and_cover_everything(count):
    ids = list(range(100, 110))
    parts = [chunk_ids(ids, i, count) for i in range(count)]
    assert sorted(x for p in parts for x in p) == ids
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    if count > len(ids):
        assert sizes.count(0) == count - len(ids)  # empty chunks are fine
    with pytest.raises(ValueError, match="does not exist"):
        chunk_ids(ids, count, count)


def _dialogue(qid=7):
    return Dialogue(qid, 3, "I saw a man.", "I saw a man with a red top.",
                    ("Was he carrying a bag?", "What colour were his shoes?"),
                    ("No, he did not carry a bag.", "His shoes were white."))


def test_query_update_cleans_answers():
    assert clean_answer("Yes, he carried a black backpack.") == "He carried a black backpack."
    assert clean_answer("B) Her top was blue.") == "Her top was blue."
    assert clean_answer("I don't know.") == ""
    assert clean_answer("His shoes were white. He also") == "His shoes were white."
    assert append_answer("I saw a man.", "I don't know.") == "I saw a man."


def test_restore_replays_saved_rounds():
    fresh = [_dialogue()]
    rows = [
        {"query_id": 7, "pid": 3, "round": 0, "query": "I saw a man.", "target_rank": 5,
         "top_k": [1], "candidates": [1], "seen_images": [1],
         "question": "What colour were his shoes?", "answer": "His shoes were white.",
         "query_feat": np.zeros(4, np.float32)},
        {"query_id": 7, "pid": 3, "round": 1, "query": "I saw a man. His shoes were white.",
         "target_rank": 2, "top_k": [1], "candidates": [1], "seen_images": [1],
         "question": "Is it raining?", "answer": "I don't know.",
         "query_feat": np.zeros(4, np.float32)},
    ]
    frame = rows_table(rows, 4).to_pandas()
    assert restore(fresh, frame) == 2
    d = fresh[0]
    assert d.query == "I saw a man. His shoes were white."
    assert d.questions == ["What colour were his shoes?", "Is it raining?"]
    assert d.asked == {1}  # the annotated question's index, for random/oracle


def test_random_asker_is_seeded_and_never_repeats():
    d = _dialogue()
    ctx = RoundContext(0, [d], None, None, [5])
    first = RandomAnnotated(seed=1).ask(ctx)[0]
    assert first.question in d.annotated_questions
    assert RandomAnnotated(seed=1).ask(ctx)[0].question == first.question
    advance(d, first.question, "x", first.annotated_index)
    second = RandomAnnotated(seed=1).ask(RoundContext(1, [d], None, None, [5]))[0]
    assert second.question != first.question
    advance(d, second.question, "y", second.annotated_index)
    third = RandomAnnotated(seed=1).ask(RoundContext(2, [d], None, None, [5]))[0]
    assert third.question == "" and third.answer == ""  # nothing left to ask
    assert {template_for(0, q, r) for q in range(20) for r in range(5)} == {0, 1, 2}


@pytest.mark.parametrize("question, earlier, repeat", [
    ("What colour were her hair?", ["What colour was her hair?"], True),
    ("What shoes was he wearing?", ["What colour were his shoes?"], True),
    ("Was he have a bag?", ["Is it raining?", "Was he wearing a bag?"], True),
    ("Was her hair short or long? A) long B) black", ["Was her hair short or long?"], True),
    ("Did she have long hair?", ["What colour was her hair?"], False),
    ("What colour were his trousers?", ["What colour were his shoes?"], False),
    ("Did he wear a hat?", [], False),
    ("Was his hair blonde?", ["What colour was his hair?"], True),
    ("Did she have short hair?", ["How long was her hair?"], True),
    ("Was she wearing a bag?", ["What kind of bag did she carry, if any?"], True),
    ("Was her bag red?", ["Was her hair long?", "What colour were her shoes?"], False),
    ("Was she wearing a hat?", ["Did she have anything on her head?"], True),
    ("Did he carry a backpack?", ["Did he wear sneakers?"], False),
])
def test_repeats_are_judged_by_content_words(question, earlier, repeat):
    assert is_repeat(question, earlier) is repeat


@pytest.mark.parametrize("question, said", [
    ("What colour was her jacket?", True),  # "a black jacket"
    ("Was her jacket purple?", True),
    ("What colour was the top she wore?", True),  # one upper garment: the jacket
    ("What colour were her trousers?", False),  # "trousers" without a colour: still open
    ("Were her jeans grey?", False),
    ("What kind of top was she wearing?", False),  # names no attribute: never counted
    ("What colour was her hair?", True),  # from the answer "Her hair was brown and short."
    ("Did she have long hair?", True),
    ("What colour were her shoes?", False),
    # Generic words give way to the item they qualify; "long-sleeved" is no hair length.
    ("What colour were the clothes on her upper body?", True),
    ("What colour were the clothes on her lower body?", False),
    ("What colour was her long-sleeved shirt?", True),
    ("What colour was her outfit?", False),  # which garment? not counted
])
def test_questions_about_what_the_witness_said(question, said):
    statements = ["I saw a woman wearing a black jacket and trousers.",
                  "Her hair was brown and short.", "I don't know."]
    assert asks_what_was_said(question, statements) is said


def test_stated_facts_pair_items_with_the_values_of_their_clause():
    assert stated_facts(["I saw a man in a t-shirt and pink jeans."]) >= {("<lower>", "<colour>")}
    assert ("<upper>", "<colour>") not in stated_facts(["I saw a man in a t-shirt and pink jeans."])
    # A clause without an item ("short") gives its value to the item before it.
    assert stated_facts(["His hair was brown and short."]) == {("hair", "<colour>"),
                                                               ("hair", "<length>")}
    assert stated_facts(["I don't know."]) == set()


def test_content_words_drop_function_words_and_name_attributes_for_values():
    assert content_words("Was she wearing a bag? A) red B) blue") == {"<bag>", "<colour>"}
    assert content_words("How long was his hair?") == {"hair", "<length>"}
    assert content_words("Was he wearing a long-sleeved shirt?") == {"<upper>"}
    assert content_words("Was he wearing a t-shirt?") == {"<upper>"}
    # An unknown hyphenated word is read as its parts (a small questioner's "long-shirt").
    assert content_words("What colour was her long-shirt?") == {"<colour>", "<length>",
                                                                "<upper>"}
    assert content_words("What did she wear on her legs?") == {"<lower>"}
    assert content_words("What colour were the clothes on his lower body?") == {
        "<clothes>", "<colour>", "<lower>"}
    assert overlap("What colour was her bag?", "Was her bag red?") == 1.0
    assert overlap("Did she have long hair?", "What colour was her hair?") == pytest.approx(1 / 3)


def _text_only_asker(votes: int = 1) -> QuestionerAsker:
    """A questioner asker whose generation the tests replace (no model, no images)."""
    return QuestionerAsker(questioner=None, visual_cache=SimpleNamespace(tokens=None),
                           gallery=None,
                           generation=GenerationConfig(max_new_tokens=8, do_sample=True,
                                                       top_p=0.5, temperature=1.0),
                           seed=0, pool_size=4, num_candidates=2, batch_size=8, votes=votes)


def test_questioner_redraws_repeats_and_keeps_the_least_repeating(monkeypatch):
    import llava_reid.questioner.generate as gen

    draws = iter([["Was she wearing a bag?", "What colour was her hair?"],  # 2nd is a repeat
                  ["What colour were her hair?"],  # still a repeat
                  ["Was her hair blonde?"],  # asks the hair colour again
                  ["Was she wearing glasses?"]])  # no repeat: kept, no more draws
    calls = []

    def fake_generate(q, prompts, image_ids, tokens, seeds, cfg, prefix_cache, batch_size):
        calls.append((len(prompts), cfg.top_p, cfg.temperature))
        return GenerationResult(questions=next(draws), seen=[[] for _ in prompts])

    monkeypatch.setattr(gen, "generate_questions", fake_generate)
    asker = _text_only_asker()
    fresh, asked = _dialogue(), _dialogue()
    asked.questions = ["What colour was her hair?"]
    ctx = RoundContext(1, [fresh, asked], None, None, [5, 5])
    first = next(draws)
    out = asker.avoid_repeats(ctx, ["p0", "p1"], [[1], [2]], first)
    assert out == ["Was she wearing a bag?", "Was she wearing glasses?"]
    # Only the repeating dialogue is redrawn, each time with a wider nucleus and hotter.
    assert calls == [(1, 0.9, 1.125), (1, 0.9, 1.25), (1, 0.9, 1.375)]


def test_questioner_redraws_a_question_about_what_the_witness_said(monkeypatch):
    import llava_reid.questioner.generate as gen

    draws = iter([["Was his jacket blue?"], ["What colour were his jeans?"]])

    def fake_generate(q, prompts, image_ids, tokens, seeds, cfg, prefix_cache, batch_size):
        return GenerationResult(questions=next(draws), seen=[[] for _ in prompts])

    monkeypatch.setattr(gen, "generate_questions", fake_generate)
    asker = _text_only_asker()
    d = _dialogue()
    d.initial = "I saw a man in a blue jacket and jeans."
    ctx = RoundContext(0, [d], None, None, [5])
    assert asker.avoid_repeats(ctx, ["p0"], [[1]], next(draws)) == ["What colour were his jeans?"]


def test_consensus_asks_the_topic_most_samples_ask():
    asker = _text_only_asker(votes=6)
    d = _dialogue()
    d.initial = "I saw a man in a blue jacket and jeans."
    samples = ["What colour were his shoes?",  # the likeliest single wording
               "Were his jeans red?", "What colour was his jacket?",  # the jacket: said
               "What colour were his jeans?", "Was his jacket blue?", "Were his jeans grey?"]
    assert asker.consensus(d, samples) == "Were his jeans red?"
    # Nothing open: the first sample stays, for avoid_repeats to redraw.
    said = ["What colour was his jacket?", "Was his jacket blue?"]
    assert asker.consensus(d, said) == said[0]


@pytest.mark.parametrize("question, one_item", [
    ("What colour were her shoes?", True),
    ("Was she carrying anything, like a bag?", True),
    ("Was her top sweater, long-sleeved shirt or t-shirt? A) sweater B) t-shirt", True),
    ("What colour were the clothes on her lower body?", True),
    ("What colour were theStudy?", False),  # no item
    ("Was he wearing a blonde?", False),
    ("What shoes was she wear on her lower body?", False),  # two items
    ("Was his hair short or a bag?", False),
])
def test_a_question_names_one_item(question, one_item):
    assert names_one_item(question) is one_item


def test_garbled_samples_neither_vote_nor_survive_a_redraw(monkeypatch):
    """A hot redraw of a small questioner is often garbled; garbled text is no repeat of
    anything, yet it wastes the round as surely as one (the witness can only guess what it
    asks), so it neither wins the vote nor replaces a question."""
    import llava_reid.questioner.generate as gen

    asker = _text_only_asker(votes=3)
    d = _dialogue()
    samples = ["What shoes was she wear on her lower body?", "Were her?",
               "What colour was her bag?"]
    assert asker.consensus(d, samples) == "What colour was her bag?"
    draws = iter([["Was his hair short or a bag?"], ["What colour were theStudy?"],
                  ["Were her jeans grey?"]])

    def fake_generate(q, prompts, image_ids, tokens, seeds, cfg, prefix_cache, batch_size):
        return GenerationResult(questions=next(draws), seen=[[] for _ in prompts])

    monkeypatch.setattr(gen, "generate_questions", fake_generate)
    ctx = RoundContext(1, [d], None, None, [5])
    assert asker.avoid_repeats(ctx, ["p0"], [[1]], ["Were her?"]) == ["Were her jeans grey?"]


def _chunk(tmp_path, name, ids, rounds=2):
    rows = [{"query_id": q, "pid": q, "round": r, "query": "q", "target_rank": 1, "top_k": [0],
             "candidates": [], "seen_images": [], "question": "", "answer": "",
             "query_feat": np.ones(4, np.float32)} for q in ids for r in range(rounds)]
    path = tmp_path / name
    write_table(rows_table(rows, 4), path, "dialogues", config_hash="x", producer="test")
    return str(path)


def test_merge_joins_by_query_id_and_rejects_gaps_and_duplicates(tmp_path):
    a = _chunk(tmp_path, "0.parquet", [3, 1])
    b = _chunk(tmp_path, "1.parquet", [2])
    empty = _chunk(tmp_path, "2.parquet", [])
    table = merge_chunks([b, empty, a], [1, 2, 3])
    assert table.column("query_id").to_pylist() == [1, 1, 2, 2, 3, 3]
    assert table.column("round").to_pylist() == [0, 1] * 3
    with pytest.raises(ArtifactError, match=r"missing \[2\]"):
        merge_chunks([a], [1, 2, 3])
    with pytest.raises(ArtifactError, match="duplicated 2"):
        merge_chunks([a, a, b], [1, 2, 3])
    assert isinstance(table, pa.Table)


def test_nproc_relaunches_under_torchrun(monkeypatch):
    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd: calls.append(cmd) or 0)
    assert _relaunch_distributed(4, ["--nproc", "4", "train-questioner", "--config", "{}"]) == 0
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert cmd[-3:] == ["train-questioner", "--config", "{}"] and "--nproc" not in cmd


def test_question_bank_holds_every_gallery_images_pairs(monkeypatch):
    import pandas as pd
    import torch

    from llava_reid.dialogue import evaluate

    table = pd.DataFrame({"image_idx": [3, 5, 9], "questions": [["q3a", "q3b"], ["q5"], ["q9"]],
                          "answers": [["a3a", "a3b"], ["a5"], ["a9"]]})
    monkeypatch.setattr(evaluate, "read_annotations", lambda path: table)
    bank = evaluate.question_bank("annotations.parquet", torch.tensor([9, 3]))
    assert bank == [("q9", "a9"), ("q3a", "a3a"), ("q3b", "a3b")]  # image 5: not in the gallery
