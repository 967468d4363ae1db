"""Retrieval metrics against hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llava_reid.metrics import bri, rank_metrics, target_ranks


def test_several_correct_images_hand_worked():
    # One query of pid 1; gallery pids [1, 2, 1, 3, 1]; similarities order the gallery as
    # index 1 (pid 2), 0 (pid 1), 3 (pid 3), 4 (pid 1), 2 (pid 1).
    sim = np.array([[0.8, 0.9, 0.1, 0.7, 0.5]])
    m = rank_metrics(sim, [1], [1, 2, 1, 3, 1])
    # Correct at ranks 2, 4, 5 -> first correct rank 2: R1 = 0, R5 = R10 = 100.
    assert m["R1"] == 0.0 and m["R5"] == 100.0 and m["R10"] == 100.0
    # AP = (1/2 + 2/4 + 3/5) / 3 = 1.6 / 3.
    assert m["mAP"] == pytest.approx(100 * 1.6 / 3)
    # INP = 3 correct / last correct rank 5 = 0.6.
    assert m["mINP"] == pytest.approx(60.0)
    assert target_ranks(sim, [1], [1, 2, 1, 3, 1]).tolist() == [2]


def test_ties_break_by_lower_gallery_index():
    # All similarities equal: the stable order is the gallery order.
    sim = np.zeros((2, 4))
    q, g = [7, 9], [9, 7, 9, 7]
    # Query pid 7: correct at positions 2 and 4 -> first rank 2, AP = (1/2 + 2/4)/2 = 0.5,
    # INP = 2/4. Query pid 9: correct at 1 and 3 -> rank 1, AP = (1 + 2/3)/2, INP = 2/3.
    assert target_ranks(sim, q, g).tolist() == [2, 1]
    m = rank_metrics(sim, q, g)
    assert m["R1"] == 50.0
    assert m["mAP"] == pytest.approx(100 * (0.5 + (1 + 2 / 3) / 2) / 2)
    assert m["mINP"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)


def test_tie_with_a_wrong_image_at_lower_index_counts_it_first():
    sim = np.array([[0.5, 0.5, 0.1]])
    assert target_ranks(sim, [2], [1, 2, 3]).tolist() == [2]
    assert rank_metrics(sim, [2], [1, 2, 3])["R1"] == 0.0


def test_perfect_ranking():
    sim = np.eye(3)
    m = rank_metrics(sim, [0, 1, 2], [0, 1, 2])
    assert m == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}


def test_chunked_equals_unchunked_and_numpy_equals_torch():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(37, 50)).astype(np.float32)
    sim[:, 10] = sim[:, 11]  # some exact ties
    g = rng.integers(0, 8, size=50)
    q = rng.choice(np.unique(g), size=37)
    full = rank_metrics(sim, q, g, chunk=1000)
    small = rank_metrics(sim, q, g, chunk=4)
    torch_in = rank_metrics(torch.from_numpy(sim), torch.from_numpy(q), torch.from_numpy(g))
    for k in full:
        assert full[k] == pytest.approx(small[k]) == pytest.approx(torch_in[k])
    r1 = target_ranks(sim, q, g, chunk=1000)
    assert np.array_equal(r1, target_ranks(sim, q, g, chunk=3))
    # target_ranks agrees with an explicit stable sort.
    order = np.argsort(-sim, axis=1, kind="stable")
    expected = [int(np.nonzero(g[order[i]] == q[i])[0][0]) + 1 for i in range(37)]
    assert r1.tolist() == expected
    assert full["R1"] == pytest.approx(100 * np.mean(np.array(expected) == 1))


def test_absent_identity_is_a_clear_error():
    with pytest.raises(ValueError, match=r"query 1 \(pid 5\) has no image of its identity"):
        rank_metrics(np.zeros((2, 2)), [1, 5], [1, 2])
    with pytest.raises(ValueError, match="query 0"):
        target_ranks(np.zeros((1, 2)), [9], [1, 2])


def test_shape_errors():
    with pytest.raises(ValueError, match="3 rows but 2 query pids"):
        rank_metrics(np.zeros((3, 2)), [1, 2], [1, 2])
    with pytest.raises(ValueError, match="2 columns but 3 gallery pids"):
        rank_metrics(np.zeros((2, 2)), [1, 2], [1, 2, 3])


def test_bri_hand_worked():
    # Two queries, two rounds. Query A ranks 4 -> 2 -> 8 (best 4, 2, 2); query B 1 -> 1 -> 1.
    ranks = [[4, 1], [2, 1], [8, 1]]
    # Round 0: mean_q[(ln4 + ln2)/2, 0] = (ln4 + ln2)/4; round 1: mean_q[(ln2 + ln2)/2, 0] = ln2/2.
    expected = ((math.log(4) + math.log(2)) / 4 + math.log(2) / 2) / 2
    assert bri(ranks) == pytest.approx(expected)
    assert bri(torch.tensor(ranks)) == pytest.approx(expected)
    assert bri([[1, 1], [1, 1]]) == 0.0
    with pytest.raises(ValueError, match="1-based"):
        bri([[0], [1]])
    with pytest.raises(ValueError, match="rounds"):
        bri([[1, 2]])
