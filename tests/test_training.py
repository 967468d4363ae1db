"""Shared training helpers: epoch batches (plain and length-grouped), schedules."""

from __future__ import annotations

import random

import pytest

from llava_reid.training import epoch_shard, warmup_cosine


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(200, 340) for _ in range(n)]


def _padding(batches: list[list[int]], lengths: list[int]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_plain_batches_are_a_seeded_permutation_without_the_last_partial_batch():
    batches = epoch_shard(103, epoch=1, seed=7, world=1, rank=0, per_process=10)
    flat = [i for b in batches for i in b]
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)
    assert len(set(flat)) == 100 and set(flat) <= set(range(103))
    assert batches == epoch_shard(103, 1, 7, 1, 0, 10)
    assert batches != epoch_shard(103, 2, 7, 1, 0, 10)


def test_length_grouped_batches_hold_the_same_items_with_little_padding():
    lengths = _lengths(1000)
    plain = epoch_shard(1000, 3, 11, 1, 0, 32)
    grouped = epoch_shard(1000, 3, 11, 1, 0, 32, lengths)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    assert all(len(b) == 32 for b in grouped)
    assert _padding(grouped, lengths) < _padding(plain, lengths) / 3
    # Seeded; a new epoch draws new groups and a new batch order.
    assert grouped == epoch_shard(1000, 3, 11, 1, 0, 32, lengths)
    assert grouped != epoch_shard(1000, 4, 11, 1, 0, 32, lengths)
    # Batch order is shuffled: not sorted by length across the epoch.
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)
    # group <= 1 (or no lengths) gives the plain batches.
    assert epoch_shard(1000, 3, 11, 1, 0, 32, lengths, group=1) == plain


def test_grouped_batches_split_across_ranks_without_overlap():
    lengths = _lengths(500, seed=1)
    ranks = [epoch_shard(500, 1, 5, 2, r, 8, lengths) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 500 // 16
    for step in range(len(ranks[0])):
        assert not set(ranks[0][step]) & set(ranks[1][step])
    together = sorted(i for r in ranks for b in r for i in b)
    single = sorted(i for b in epoch_shard(500, 1, 5, 1, 0, 16, lengths) for i in b)
    assert together == single


def test_length_count_must_match():
    with pytest.raises(ValueError, match="3 lengths for 4 items"):
        epoch_shard(4, 1, 0, 1, 0, 2, [1, 2, 3])


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, warmup_factor=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
