"""Identity folds of the training split, for cross-fitted look-ahead labels.

A retriever ranks the images it was trained on far better than unseen ones, and unevenly so: on
its own training images an answer about a hat or a bag still moves the target, while on unseen
ones it hardly does. Look-ahead labels computed with it teach the questioner to ask what helps
on memorised images only. With ``prepare.cross_fit`` folds, each fold's labels come from a
retriever trained without that fold's identities, so the labels see the retriever as the test
split will.

Folds split identities, never an identity's images: a seeded permutation of the sorted pids,
dealt round-robin, so fold sizes differ by at most one identity.
"""

from __future__ import annotations

import numpy as np


def identity_folds(pids, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each entry of ``pids``; the same pid always gets the same fold."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    pids = np.asarray(pids)
    unique = np.unique(pids)
    if len(unique) < folds:
        raise ValueError(f"{len(unique)} identities cannot fill {folds} folds")
    order = np.random.default_rng([seed, 41, folds]).permutation(len(unique))
    fold_of_unique = np.empty(len(unique), dtype=np.int64)
    fold_of_unique[order] = np.arange(len(unique)) % folds
    return fold_of_unique[np.searchsorted(unique, pids)]


def parse_fold(fold: str | None) -> tuple[int, int] | None:
    """``"k/N"`` (fold k of N, 0-based) -> (k, N); None -> None."""
    if fold is None:
        return None
    try:
        k, n = (int(part) for part in fold.split("/"))
    except ValueError:
        raise ValueError(f"--fold {fold!r}: expected K/N, e.g. 0/2") from None
    if n < 2 or not 0 <= k < n:
        raise ValueError(f"--fold {fold!r}: need 0 <= K < N and N >= 2")
    return k, n
