"""cache-features: encode one split's gallery images and queries with the trained retriever.

``features/{split}_gallery.parquet``: image_idx, pid, file_path, feat (L2-normalised).
``features/{split}_queries.parquet``: one query per image (its initial description, the
witness's first words) or, for the caption benchmarks, one per caption (llava_reid.data.queries),
with its target image and the initial- and fine-grained-description features.
Downstream stages rank against these features and never re-encode gallery images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from llava_reid.artifacts import ArtifactError, write_table
from llava_reid.data.annotations import read_annotations
from llava_reid.data.folds import identity_folds, parse_fold
from llava_reid.data.queries import query_source, split_queries
from llava_reid.retriever.encoder import RetrieverEncoder
from llava_reid.runtime import config_hash
from llava_reid.stage_views import config_key, typed_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturesConfig:
    """Every setting cache-features reads, built once from its validated config view."""

    seed: int
    device: str
    batch_size: int = config_key("features.batch_size")  # images or texts encoded at once

    def tag(self) -> dict[str, Any]:
        """The config part of the feature tables' ``config_hash`` (the model path is added)."""
        return {"features": {"batch_size": self.batch_size}}


def embedding_column(feats: np.ndarray) -> pa.FixedSizeListArray:
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])


def run(
    cfg: dict[str, Any],
    annotations: str,
    image_root: str,
    model: str,
    split: str,
    gallery_out: str,
    queries_out: str,
    fold: str | None = None,
) -> None:
    """``fold`` "k/N": only the split's images of identities in fold k of N
    (llava_reid.data.folds), for the retriever trained without them."""
    rows = read_annotations(annotations, split=split)
    if rows.empty:
        raise ArtifactError(f"{annotations}: split {split!r} has no images")
    settings = typed_view(FeaturesConfig, cfg)
    selected = parse_fold(fold)
    if selected is not None:
        k, n = selected
        rows = rows[identity_folds(rows.pid, n, settings.seed) == k]
    encoder = RetrieverEncoder.from_pretrained(model, settings.device)
    bs = settings.batch_size
    root = Path(image_root)
    gallery = encoder.encode_images([root / p for p in rows.file_path], bs).cpu().numpy()
    queries = split_queries(rows, query_source(annotations))
    initial = encoder.encode_texts(list(queries.initial_description), bs).cpu().numpy()
    fine = encoder.encode_texts(list(queries.fine_grained_description), bs).cpu().numpy()

    meta = {"model": str(model), "split": split, "embed_dim": int(gallery.shape[1])}
    tagged = {**settings.tag(), "model": str(model)}
    if fold is not None:
        meta["fold"] = tagged["fold"] = fold
    tag = config_hash(tagged)
    write_table(
        pa.table({
            "image_idx": pa.array(rows.image_idx.to_numpy(), pa.int32()),
            "pid": pa.array(rows.pid.to_numpy(), pa.int64()),
            "file_path": pa.array(list(rows.file_path), pa.string()),
            "feat": embedding_column(gallery),
        }),
        gallery_out, "gallery_features", config_hash=tag, producer="cache-features",
        extra_metadata=meta,
    )
    write_table(
        pa.table({
            "query_id": pa.array(queries.query_id.to_numpy(), pa.int32()),
            "image_idx": pa.array(queries.image_idx.to_numpy(), pa.int32()),
            "pid": pa.array(queries.pid.to_numpy(), pa.int64()),
            "initial_description": pa.array(list(queries.initial_description), pa.string()),
            "initial_feat": embedding_column(initial),
            "fine_grained_feat": embedding_column(fine),
        }),
        queries_out, "query_features", config_hash=tag, producer="cache-features",
        extra_metadata=meta,
    )
    log.info("%s: %d gallery images, %d queries, dim %d", split, len(rows), len(queries),
             gallery.shape[1])
