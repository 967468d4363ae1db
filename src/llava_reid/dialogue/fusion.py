"""An external retriever's similarity fused into every round's ranking.

``evaluate.auxiliary_similarity: {path, weight}``: a score for every (test query, test gallery
image) pair from any retriever (IRRA, RDE, ...), and each round ranks the gallery by
``(1 - weight) * dialogue similarity + weight * auxiliary``. The dialogue similarity changes
every round (the query grows); the auxiliary score is the external model's view of the
dataset's caption and stays fixed.

Two file shapes:

- Parquet, one row per pair: ``query_id`` (int), ``image_idx`` (int), ``score`` (float);
- ``.npz`` with a dense matrix and its id columns: ``similarity`` [Q, G], ``query_id`` [Q],
  ``image_idx`` [G] (``numpy.savez(path, similarity=S, query_id=q, image_idx=g)``).

Ids are the test split's: ``query_id`` from ``features/test_queries.parquet`` (for the caption
benchmarks, the caption's number among the test captions in file order) and ``image_idx`` from
``features/test_gallery.parquet``. Every pair must be there exactly once; anything else is an
error naming the file and the ids. ``llava-reid export-similarity`` writes our own retriever's
scores in the Parquet shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llava_reid.artifacts import atomic_path, embeddings, read_table
from llava_reid.metrics import bri, rank_metrics, target_ranks
from llava_reid.retriever.gallery import Gallery

log = logging.getLogger(__name__)


class AuxiliarySimilarityError(ValueError):
    """The auxiliary similarity file is unreadable or does not match the test split."""


def _ids(path: Path, what: str, values: np.ndarray) -> np.ndarray:
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise AuxiliarySimilarityError(f"{path}: {what} must be a 1-D integer column, got "
                                       f"{values.dtype} with shape {values.shape}")
    return values.astype(np.int64)


def _read_dense(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("similarity", "query_id", "image_idx") if k not in data]
            if missing:
                raise AuxiliarySimilarityError(f"{path}: arrays {missing} missing (expected "
                                               f"similarity, query_id, image_idx)")
            sim, qids, gids = data["similarity"], data["query_id"], data["image_idx"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, AuxiliarySimilarityError):
            raise
        raise AuxiliarySimilarityError(f"{path}: not a readable .npz file ({exc})") from exc
    qids, gids = _ids(path, "query_id", qids), _ids(path, "image_idx", gids)
    if sim.shape != (len(qids), len(gids)):
        raise AuxiliarySimilarityError(
            f"{path}: similarity has shape {sim.shape}, expected ({len(qids)}, {len(gids)}) "
            f"= (len(query_id), len(image_idx))")
    return qids, gids, np.asarray(sim, dtype=np.float32)


def _read_long(path: Path, gallery_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise AuxiliarySimilarityError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in ("query_id", "image_idx", "score") if c not in table.column_names]
    if missing:
        raise AuxiliarySimilarityError(f"{path}: columns {missing} missing (expected query_id, "
                                       f"image_idx, score)")
    q = _ids(path, "query_id", table.column("query_id").to_numpy())
    g = _ids(path, "image_idx", table.column("image_idx").to_numpy())
    score = table.column("score").to_numpy(zero_copy_only=False)
    if not np.issubdtype(score.dtype, np.number):
        raise AuxiliarySimilarityError(f"{path}: column 'score' must be numeric, got {score.dtype}")
    qids = np.unique(q)
    unknown = np.setdiff1d(np.unique(g), gallery_ids)
    if len(unknown):
        raise AuxiliarySimilarityError(
            f"{path}: image_idx {unknown[:5].tolist()} are not test gallery images")
    row = np.searchsorted(qids, q)
    col_of = {int(v): i for i, v in enumerate(gallery_ids)}
    col = np.fromiter((col_of[int(v)] for v in g), np.int64, len(g))
    flat = row * len(gallery_ids) + col
    if len(np.unique(flat)) != len(flat):
        dup = np.flatnonzero(np.bincount(flat) > 1)[0]
        raise AuxiliarySimilarityError(
            f"{path}: pair (query_id {int(qids[dup // len(gallery_ids)])}, image_idx "
            f"{int(gallery_ids[dup % len(gallery_ids)])}) appears more than once")
    if len(flat) != len(qids) * len(gallery_ids):
        missing_pair = np.setdiff1d(np.arange(len(qids) * len(gallery_ids)), flat)[0]
        raise AuxiliarySimilarityError(
            f"{path}: no score for (query_id {int(qids[missing_pair // len(gallery_ids)])}, "
            f"image_idx {int(gallery_ids[missing_pair % len(gallery_ids)])}); every test query "
            f"needs a score for every test gallery image")
    sim = np.empty(len(qids) * len(gallery_ids), np.float32)
    sim[flat] = score
    return qids, gallery_ids.astype(np.int64), sim.reshape(len(qids), len(gallery_ids))


class AuxiliarySimilarity:
    """The external scores aligned with the gallery's order, and the fused ranking."""

    def __init__(self, path: str | Path, weight: float, query_ids: list[int], gallery: Gallery):
        self.path, self.weight = Path(path), float(weight)
        if not 0.0 <= self.weight <= 1.0:
            raise AuxiliarySimilarityError(
                f"evaluate.auxiliary_similarity.weight = {weight}: expected 0 <= weight <= 1")
        if not self.path.is_file():
            raise AuxiliarySimilarityError(f"{self.path}: auxiliary similarity file not found")
        gallery_ids = gallery.image_idx.cpu().numpy().astype(np.int64)
        if self.path.suffix == ".npz":
            qids, gids, sim = _read_dense(self.path)
        else:
            qids, gids, sim = _read_long(self.path, gallery_ids)
        if len(np.unique(qids)) != len(qids) or len(np.unique(gids)) != len(gids):
            raise AuxiliarySimilarityError(f"{self.path}: query_id or image_idx repeats")
        want_q = np.asarray(sorted(query_ids), np.int64)
        self._check_ids(qids, want_q, "query ids do not match the test split's", "queries")
        self._check_ids(gids, gallery_ids, "image ids do not match the test gallery's", "images")
        if not np.isfinite(sim).all():
            raise AuxiliarySimilarityError(f"{self.path}: scores must be finite numbers")
        col_of = {int(v): i for i, v in enumerate(gids)}
        order = np.fromiter((col_of[int(v)] for v in gallery_ids), np.int64, len(gallery_ids))
        self.row_of = {int(q): i for i, q in enumerate(qids)}
        self.scores = torch.from_numpy(np.ascontiguousarray(sim[:, order])).to(gallery.device)
        log.info("auxiliary similarity %s: %d queries x %d images, weight %g", self.path,
                 len(qids), len(gallery_ids), self.weight)

    def fuse(self, similarity: torch.Tensor, query_ids: list[int]) -> torch.Tensor:
        """(1 - w) * similarity + w * auxiliary, rows in ``query_ids`` order [Q, G]."""
        rows = torch.tensor([self.row_of[int(q)] for q in query_ids], device=self.scores.device)
        aux = self.scores[rows].to(similarity.device, similarity.dtype)
        return (1.0 - self.weight) * similarity + self.weight * aux

    def _check_ids(self, got: np.ndarray, want: np.ndarray, problem: str, what: str) -> None:
        missing, extra = np.setdiff1d(want, got), np.setdiff1d(got, want)
        if len(missing) or len(extra):
            raise AuxiliarySimilarityError(
                f"{self.path}: {problem} {len(want)} {what} "
                f"(missing {missing[:5].tolist()}, unknown {extra[:5].tolist()})")

    def rank(self, gallery: Gallery, query_feats: torch.Tensor, query_ids: list[int],
             target_pids: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
        """Each query's 1-based target rank and its top-``k`` gallery rows under the fused
        similarity (ties broken like Gallery: lower gallery position first)."""
        sim = self.fuse(gallery.similarity(query_feats).float(), query_ids)
        ranks = np.asarray(target_ranks(sim, target_pids.to(gallery.device), gallery.pids))
        pools = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :min(k, len(gallery))]
        return ranks.tolist(), pools


@dataclass(frozen=True)
class AuxiliarySimilaritySettings:
    """The ``evaluate.auxiliary_similarity`` section (optional: absent = no fusion)."""

    path: str | None  # the scores file; None = no fusion
    weight: float


def from_settings(settings: AuxiliarySimilaritySettings | None, query_ids: list[int],
                  gallery: Gallery) -> AuxiliarySimilarity | None:
    """The configured auxiliary similarity, or None."""
    if settings is None or not settings.path:
        return None
    return AuxiliarySimilarity(settings.path, settings.weight, query_ids, gallery)


def export(cfg: dict[str, Any], gallery: str, queries: str, out: str) -> None:
    """export-similarity: our retriever's score of every test query's initial text against
    every gallery image, in the auxiliary-similarity Parquet shape."""
    test_gallery = Gallery.from_parquet(gallery)
    q = read_table(queries, "query_features")
    feats = torch.from_numpy(embeddings(q, "initial_feat").copy())
    sim = test_gallery.similarity(torch.nn.functional.normalize(feats, dim=-1))
    sim = sim.float().cpu().numpy()
    qids = q.column("query_id").to_numpy().astype(np.int32)
    gids = test_gallery.image_idx.cpu().numpy().astype(np.int32)
    table = pa.table({
        "query_id": pa.array(np.repeat(qids, len(gids)), pa.int32()),
        "image_idx": pa.array(np.tile(gids, len(qids)), pa.int32()),
        "score": pa.array(sim.reshape(-1), pa.float32()),
    })
    with atomic_path(out, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    log.info("%d queries x %d images -> %s", len(qids), len(gids), out)


def round_metrics(table: pa.Table, gallery: Gallery, auxiliary: AuxiliarySimilarity | None
                  ) -> tuple[list[dict[str, float]], float]:
    """Per-round R@k / mAP / mINP and BRI of merged dialogues, ranked by the dialogue's
    similarity alone (``auxiliary`` None) or fused with the auxiliary scores."""
    rounds = table.column("round").to_numpy()
    feats = embeddings(table, "query_feat")
    pids = table.column("pid").to_numpy()
    qids = table.column("query_id").to_numpy()
    per_round, ranks = [], []
    for r in range(int(rounds.max()) + 1):
        sel = rounds == r
        sim = gallery.similarity(torch.from_numpy(feats[sel])).float()
        if auxiliary is not None:
            sim = auxiliary.fuse(sim, qids[sel].tolist())
        qp = torch.from_numpy(pids[sel])
        metrics = rank_metrics(sim, qp, gallery.pids)
        per_round.append({"round": r, **{k: round(v, 3) for k, v in metrics.items()}})
        ranks.append(np.asarray(target_ranks(sim, qp.to(gallery.device), gallery.pids)))
    score = bri(np.stack(ranks)) if len(ranks) > 1 else float("nan")
    return per_round, score
