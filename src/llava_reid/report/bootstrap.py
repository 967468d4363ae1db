"""Bootstrap confidence intervals of recall over test queries.

Each evaluated method's ``dialogues.parquet`` holds the target's rank for every test query and
round, so R@k of a round is the mean of per-query hits (rank <= k). Resampling the queries with
replacement gives a percentile interval for every method, round and k. The same resampled query
sets are used for every method (the methods answer the same test queries), so the difference
between two methods gets a paired interval: much tighter than comparing two separate intervals
when the methods succeed and fail on mostly the same queries.

Deterministic: the resamples come from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llava_reid.artifacts import read_table

RESAMPLES = 1000
CONFIDENCE = 0.95
KS = (1, 5, 10)


class BootstrapError(ValueError):
    """Dialogue tables that cannot be compared query by query."""


@dataclass
class Ranks:
    """Target ranks of one method: ``ranks[round, query]``, queries in ``query_ids`` order."""

    query_ids: np.ndarray
    ranks: np.ndarray


def load_ranks(path: str) -> Ranks:
    """Target rank of every query and round from a dialogues.parquet (rounds 0..R, each query
    once per round)."""
    table = read_table(path, "dialogues", columns=["query_id", "round", "target_rank"])
    qid = table.column("query_id").to_numpy()
    rnd = table.column("round").to_numpy()
    rank = table.column("target_rank").to_numpy()
    ids = np.unique(qid)
    n_rounds = int(rnd.max()) + 1 if len(rnd) else 0
    if len(qid) != len(ids) * n_rounds:
        raise BootstrapError(
            f"{path}: {len(qid)} rows for {len(ids)} queries x {n_rounds} rounds "
            "(every query needs exactly one row per round)")
    out = np.zeros((n_rounds, len(ids)), dtype=np.int64)
    seen = np.zeros((n_rounds, len(ids)), dtype=bool)
    col = np.searchsorted(ids, qid)
    out[rnd, col] = rank
    seen[rnd, col] = True
    if not seen.all():
        r, q = np.argwhere(~seen)[0]
        raise BootstrapError(f"{path}: query {ids[q]} has no row for round {r}")
    return Ranks(ids, out)


def resample_indices(n_queries: int, seed: int, resamples: int = RESAMPLES) -> np.ndarray:
    """``[resamples, n_queries]`` query indices drawn with replacement."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_queries, size=(resamples, n_queries), dtype=np.int32)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def recall_intervals(ranks: Ranks, idx: np.ndarray, confidence: float = CONFIDENCE,
                     ks: tuple[int, ...] = KS) -> list[dict[str, tuple[float, float]]]:
    """Per round: ``{"R1": (low, high), ...}`` in percent."""
    out = []
    for round_ranks in ranks.ranks:
        cis = {}
        for k in ks:
            hits = (round_ranks <= k).astype(np.float64)
            cis[f"R{k}"] = tuple(100.0 * v for v in _interval(hits[idx].mean(axis=1), confidence))
        out.append(cis)
    return out


def difference_interval(a: Ranks, b: Ranks, round_: int, idx: np.ndarray, k: int = 1,
                        confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """R@k of ``a`` minus R@k of ``b`` at one round, with its paired interval, in points."""
    if not np.array_equal(a.query_ids, b.query_ids):
        raise BootstrapError("the two methods were evaluated on different test queries")
    diff = (a.ranks[round_] <= k).astype(np.float64) - (b.ranks[round_] <= k).astype(np.float64)
    lo, hi = _interval(diff[idx].mean(axis=1), confidence)
    return 100.0 * float(diff.mean()), 100.0 * lo, 100.0 * hi
