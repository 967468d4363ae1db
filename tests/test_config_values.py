"""Config values whose meaning is a maximum (the schema says so): the run uses them as such."""

from __future__ import annotations

import copy

from llava_reid.data import attributes as A
from llava_reid.data.synthetic import plan_dataset
from llava_reid.tokenization import train_bpe_tokenizer
from tests.conftest import base_config, small_config


def test_questions_per_image_is_a_maximum():
    synthetic_cfg = small_config()["data"]["synthetic"]
    open_slots = {len(A.SLOTS) - len(A.slots_of(f)) for f in synthetic_cfg["initial_facts"]}
    assert open_slots == {7} and base_config()["data"]["synthetic"]["questions_per_image"] == 7
    records, _ = plan_dataset(synthetic_cfg, 1234)
    assert {len(r["questions"]) for r in records} == {7}
    more = copy.deepcopy(synthetic_cfg)
    more["questions_per_image"] = 9  # cannot be reached: the same records
    assert plan_dataset(more, 1234)[0] == records
    fewer = copy.deepcopy(synthetic_cfg)
    fewer["questions_per_image"] = 4
    assert {len(r["questions"]) for r in plan_dataset(fewer, 1234)[0]} == {4}


def test_vocab_size_is_a_maximum():
    text = ["a man in a red sweater and jeans", "does he carry a bag?", "no bag"] * 5
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    small = train_bpe_tokenizer(text, 300, special)
    assert len(small) < 300  # the text runs out of merges first
    assert len(train_bpe_tokenizer(text, 3000, special)) == len(small)
    assert len(train_bpe_tokenizer(text, len(small) - 5, special)) == len(small) - 5
