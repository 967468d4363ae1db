"""Evaluation plumbing: balanced chunks, resume replay, merge checks, askers, the launcher."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from llava_reid.artifacts import ArtifactError, write_table
from llava_reid.cli import _relaunch_distributed
from llava_reid.interact.askers import Dialogue, RandomAnnotated, RoundContext, template_for
from llava_reid.interact.engine import advance
from llava_reid.interact.evaluate import chunk_ids, restore, rows_table
from llava_reid.interact.merge import merge_chunks
from llava_reid.interact.query import append_answer, clean_answer


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
