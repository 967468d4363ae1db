"""Retrieval metrics for text-to-image person re-identification.

All functions take a similarity matrix ``[Q, G]`` (higher = more similar; torch tensor or numpy
array) with the identity of each query and each gallery image, and work on the tensor's device
in chunks of queries, so a large query x gallery never needs a full sort in memory at once.

Ranking order: descending similarity; ties are broken by the lower gallery index first (a
stable sort), so results do not depend on hardware or sort implementation. Scores are ranked in
their own precision (float64 stays float64: a cast would turn distinct scores into ties).

- ``rank_metrics``: CMC R@k, mAP and mINP in percent, the standard definitions used by IRRA:
  R@k = % of queries with a correct image in the top k; AP = mean over the correct images of
  (correct images up to and including it) / (its rank); INP = (number of correct images) /
  (rank of the last correct image); mAP and mINP average over queries.
- ``target_ranks``: the 1-based rank of the first correct image per query.
- ``bri``: the Best-Rank Improvement score of an interactive run (lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:  # pragma: no cover - message only
        raise TypeError(f"{name}: expected a torch tensor or numpy array") from exc


def _check(similarity, query_pids, gallery_pids):
    sim = _as_tensor(similarity, "similarity")
    qp = _as_tensor(query_pids, "query_pids").to(sim.device).reshape(-1)
    gp = _as_tensor(gallery_pids, "gallery_pids").to(sim.device).reshape(-1)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be [queries, gallery], got shape {tuple(sim.shape)}")
    if sim.shape[0] != len(qp):
        raise ValueError(f"similarity has {sim.shape[0]} rows but {len(qp)} query pids")
    if sim.shape[1] != len(gp):
        raise ValueError(f"similarity has {sim.shape[1]} columns but {len(gp)} gallery pids")
    present = torch.isin(qp, gp)
    if not bool(present.all()):
        i = int((~present).nonzero()[0])
        raise ValueError(
            f"query {i} (pid {int(qp[i])}) has no image of its identity in the gallery"
        )
    return sim, qp, gp


def _scores(sim: torch.Tensor) -> torch.Tensor:
    """Floating scores as they are; integer or boolean scores as float64 (exact)."""
    return sim if sim.is_floating_point() else sim.double()


def _sorted_matches(sim: torch.Tensor, qp: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """Boolean [q, G]: is the image at each rank position a correct match."""
    order = torch.sort(_scores(sim), dim=1, descending=True, stable=True).indices
    return gp[order] == qp[:, None]


def rank_metrics(
    similarity, query_pids, gallery_pids, ks: Sequence[int] = (1, 5, 10), chunk: int = 512
) -> dict[str, float]:
    """R@k for each k, mAP and mINP, in percent (see module docstring)."""
    sim, qp, gp = _check(similarity, query_pids, gallery_pids)
    n = sim.shape[0]
    if n == 0:
        raise ValueError("no queries")
    hits = {k: 0.0 for k in ks}
    ap_sum = inp_sum = 0.0
    for s in range(0, n, chunk):
        matches = _sorted_matches(sim[s : s + chunk], qp[s : s + chunk], gp)
        positions = torch.arange(1, matches.shape[1] + 1, device=matches.device)
        first = matches.float().argmax(dim=1) + 1  # 1-based rank of first correct image
        for k in ks:
            hits[k] += float((first <= k).sum())
        cum = matches.cumsum(dim=1).float()
        n_correct = matches.sum(dim=1).float()
        ap = (cum / positions * matches).sum(dim=1) / n_correct
        last = torch.where(matches, positions, torch.zeros_like(positions)).max(dim=1).values
        ap_sum += float(ap.sum())
        inp_sum += float((n_correct / last.float()).sum())
    out = {f"R{k}": 100.0 * hits[k] / n for k in ks}
    out["mAP"] = 100.0 * ap_sum / n
    out["mINP"] = 100.0 * inp_sum / n
    return out


def target_ranks(similarity, query_pids, gallery_pids, chunk: int = 512) -> np.ndarray:
    """1-based rank of the first correct gallery image for each query, int64 [Q].

    Computed without a sort: 1 + (images scoring higher than the best correct image) + (images
    scoring equal to it that sit at a lower gallery index), the same order as a stable sort.
    """
    sim, qp, gp = _check(similarity, query_pids, gallery_pids)
    out = []
    cols = torch.arange(sim.shape[1], device=sim.device)
    for s in range(0, sim.shape[0], chunk):
        block = _scores(sim[s : s + chunk])
        correct = gp[None, :] == qp[s : s + chunk, None]
        best = torch.where(correct, block, torch.full_like(block, -math.inf)).max(dim=1).values
        # The best correct image's position: the lowest index among correct ties.
        at_best = correct & (block == best[:, None])
        best_col = torch.where(at_best, cols, torch.full_like(cols, sim.shape[1])).min(dim=1).values
        above = (block > best[:, None]).sum(dim=1)
        tied_before = ((block == best[:, None]) & (cols[None, :] < best_col[:, None])).sum(dim=1)
        out.append((1 + above + tied_before).cpu())
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def bri(ranks_per_round) -> float:
    """Best-Rank Improvement of an interactive run (lower is better).

    ``ranks_per_round`` is [R+1, Q]: the first-correct rank of each query for the initial
    query (row 0) and after each of R rounds. With m_r = min(rank_0, ..., rank_r),
    BRI = (1/R) * sum_{r=0}^{R-1} mean_q[(ln m_r + ln m_{r+1}) / 2]
    (the trapezoid area under the log best-rank curve, per round).
    """
    ranks = np.asarray(_as_tensor(ranks_per_round, "ranks_per_round").cpu(), dtype=np.float64)
    if ranks.ndim != 2 or ranks.shape[0] < 2:
        raise ValueError(f"ranks_per_round must be [rounds + 1 >= 2, queries], got {ranks.shape}")
    if (ranks < 1).any():
        raise ValueError("ranks are 1-based: every rank must be >= 1")
    best = np.log(np.minimum.accumulate(ranks, axis=0))
    rounds = ranks.shape[0] - 1
    return float(np.mean((best[:-1] + best[1:]) / 2, axis=1).sum() / rounds)
