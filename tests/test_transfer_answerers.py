"""The witnesses that look at the target image: the rendered (synthetic) answerer and the
synthetic data's caption-benchmark copy. The visual chat-completions answerer against a real
server is in tests/test_transfer_visual_server.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava_reid.answerer import IDK, AnswerRequest, build_answerer
from llava_reid.answerer.base import AnswererError
from llava_reid.answerer.rendered import question_slot
from llava_reid.answerer.visual import TargetImages
from llava_reid.data import attributes as A
from llava_reid.data.annotations import read_annotations
from llava_reid.data.caption_datasets import load_caption_dataset
from llava_reid.dialogue.query import clean_answer
from tests.conftest import answerer_config


def test_question_slot_reads_every_annotated_question_style():
    rng = np.random.default_rng(0)
    for _ in range(300):
        person = A.sample_person(rng)
        for slot in A.SLOTS:
            for _ in range(3):
                _, question, _ = A.question_answer(person, slot, rng)
                assert question_slot(question) == slot, question
    assert question_slot("How tall was the person?") is None


def _requests(rows, limit=None):
    out = []
    for row in rows.itertuples():
        for j, q in enumerate(row.questions[:limit]):
            out.append(AnswerRequest(f"{row.image_idx}:{j}", int(row.image_idx), q,
                                     memory="", annotated_questions=(), annotated_answers=()))
    return out


def test_rendered_answerer_states_what_was_drawn(small_dataset, tmp_path):
    """Its answers carry the same fact as the annotators' answer to the same question, though
    it reads only the renderer's record of the image (no descriptions, no Q/A)."""
    root = small_dataset["root"]
    rows = read_annotations(small_dataset["annotations"], split="test")
    images = TargetImages(small_dataset["annotations"], root)
    answerer = build_answerer(answerer_config(kind="rendered"), images=images)
    reqs = _requests(rows)
    got = answerer.answer(reqs)
    want = [a for row in rows.itertuples() for a in row.answers]
    assert [clean_answer(g) for g in got] == [clean_answer(w) for w in want]
    # Too short, or about nothing it can see.
    odd = [AnswerRequest("x", reqs[0].target_id, "Hair?", "", (), ()),
           AnswerRequest("y", reqs[0].target_id, "What was the weather like that day?", "", (),
                         ())]
    assert answerer.answer(odd) == [IDK, IDK]


def test_rendered_answerer_knows_only_rendered_images(small_dataset, tmp_path):
    from PIL import Image

    other = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(other)
    answerer = build_answerer(answerer_config(kind="rendered"), images=TargetImages.from_paths({7: other}))
    with pytest.raises(AnswererError, match="no drawn.json in any folder above it"):
        answerer.answer([AnswerRequest("1", 7, "What colour were his shoes?", "", (), ())])
    with pytest.raises(AnswererError, match="target image 8 is not in the annotations"):
        answerer.answer([AnswerRequest("1", 8, "What colour were his shoes?", "", (), ())])
    with pytest.raises(ValueError, match="no image root was given"):
        build_answerer(answerer_config(kind="rendered"))
    with pytest.raises(ValueError, match="kind 'annotated' answers from the annotations"):
        build_answerer(answerer_config(kind="annotated", input="image"), images=TargetImages.from_paths({}))


def test_synthetic_test_split_in_rstpreid_layout(small_dataset):
    """synthesize also writes the test split as RSTPReid's data_captions.json (two captions an
    image), which the RSTPReid loader reads with the same images and identities."""
    images = small_dataset["root"] / "images"
    table = load_caption_dataset(images / "data_captions.json", images, "rstpreid")
    test = read_annotations(small_dataset["annotations"], split="test")
    assert set(table.split) == {"test"}
    assert ["images/" + p for p in table.file_path] == list(test.file_path)
    assert list(table.pid) == list(test.pid)
    assert list(table.initial_description) == list(test.initial_description)
    assert all(len(c) == 2 and c[1].startswith(("I saw", "There was", "I remember"))
               for c in table.captions)
    drawn = json.loads((images / "drawn.json").read_text())
    assert len(drawn) == len(read_annotations(small_dataset["annotations"]))
