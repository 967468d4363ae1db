"""A split's retrieval queries: which text starts each dialogue, and which image it is about.

Interactive-PEDES (and the synthetic data) has one query per image: its initial description,
with the fine-grained description the witness remembers; the query id is the image's
``image_idx``. The caption benchmarks (CUHK-PEDES, ICFG-PEDES, RSTPReid; annotations written
with ``queries: captions`` in their metadata) have one query per caption: an image with two
captions gives two queries about the same target. Their ids number the split's captions in file
order, the order IRRA-style evaluations index the text side of a similarity matrix.
"""

from __future__ import annotations

import os

import pandas as pd

from llava_reid.artifacts import read_metadata

COLUMNS = ["query_id", "image_idx", "pid", "initial_description", "fine_grained_description"]


def query_source(annotations: str | os.PathLike) -> str:
    """"captions" when every caption is a query, else "images" (one query per image)."""
    return read_metadata(annotations).get("queries", "images")


def split_queries(rows: pd.DataFrame, source: str = "images") -> pd.DataFrame:
    """The queries of one split's annotation rows (in image_idx order)."""
    if source == "images":
        return pd.DataFrame({
            "query_id": rows.image_idx.to_numpy(), "image_idx": rows.image_idx.to_numpy(),
            "pid": rows.pid.to_numpy(), "initial_description": list(rows.initial_description),
            "fine_grained_description": list(rows.fine_grained_description)})
    if source != "captions":
        raise ValueError(f"unknown query source {source!r} (expected 'images' or 'captions')")
    out = []
    for row in rows.itertuples():
        for caption in row.captions:
            # No written memory: the caption is also what the retriever's full-text view sees.
            out.append((len(out), row.image_idx, row.pid, caption, caption))
    return pd.DataFrame(out, columns=COLUMNS)
