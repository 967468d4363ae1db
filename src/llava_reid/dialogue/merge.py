"""merge-eval: join one method's evaluation chunks by query id and compute its metrics.

``eval/{method}/dialogues.parquet``: every chunk's rows, sorted by (query_id, round); each test
query must appear exactly once per round (a missing or duplicated query is an error naming
the chunk files). ``eval/{method}/metrics.json``: R@1/5/10, mAP and mINP of the query after 0..R
answers (recomputed from the stored query features against the gallery features) and BRI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from llava_reid.artifacts import (
    ArtifactError,
    embeddings,
    read_metadata,
    read_table,
    write_json,
    write_table,
)
from llava_reid.dialogue import fusion
from llava_reid.metrics import bri, rank_metrics
from llava_reid.retriever.gallery import Gallery
from llava_reid.runtime import config_hash
from llava_reid.stage_views import config_key, typed_view

log = logging.getLogger(__name__)


def merge_chunks(chunks: list[str], expected_ids: list[int]) -> pa.Table:
    tables = [read_table(c, "dialogues") for c in chunks]
    sizes = {c: t.schema.field("query_feat").type.list_size for c, t in zip(chunks, tables,
                                                                             strict=True)}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{c} ({d})" for c, d in sizes.items())
        raise ArtifactError(
            f"evaluation chunks have different query embedding sizes: {listed}; they come from "
            "different retrievers: rerun the chunks of the older one")
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    if table is None or table.num_rows == 0:
        raise ArtifactError(f"{chunks}: no dialogue rows")
    order = np.lexsort((table.column("round").to_numpy(), table.column("query_id").to_numpy()))
    table = table.take(pa.array(order))
    ids, rounds = table.column("query_id").to_numpy(), table.column("round").to_numpy()
    n_rounds = int(rounds.max()) + 1
    for r in range(n_rounds):
        got = np.sort(ids[rounds == r])
        want = np.sort(np.asarray(expected_ids))
        if len(got) != len(want) or not np.array_equal(got, want):
            extra = sorted(set(got.tolist()) - set(want.tolist()))[:5]
            missing = sorted(set(want.tolist()) - set(got.tolist()))[:5]
            dup = len(got) - len(set(got.tolist()))
            raise ArtifactError(
                f"{chunks}: round {r} covers {len(got)} queries, expected {len(want)} "
                f"(missing {missing}, unexpected {extra}, duplicated {dup})")
    return table


def round_metrics(table: pa.Table, gallery: Gallery) -> tuple[list[dict[str, float]], float]:
    rounds = table.column("round").to_numpy()
    feats = embeddings(table, "query_feat")
    pids = table.column("pid").to_numpy()
    per_round, ranks = [], []
    for r in range(int(rounds.max()) + 1):
        sel = rounds == r
        sim = torch.from_numpy(feats[sel]).to(gallery.device) @ gallery.feats.t()
        metrics = rank_metrics(sim, torch.from_numpy(pids[sel]), gallery.pids)
        per_round.append({"round": r, **{k: round(v, 3) for k, v in metrics.items()}})
        ranks.append(table.column("target_rank").to_numpy()[sel])
    score = bri(np.stack(ranks)) if len(ranks) > 1 else float("nan")
    return per_round, score


@dataclass(frozen=True)
class MergeConfig:
    """What merge-eval reads of its validated config view."""

    auxiliary_similarity: fusion.AuxiliarySimilaritySettings | None = config_key(
        "evaluate.auxiliary_similarity")


def run(cfg: dict[str, Any], method: str, chunks: list[str], gallery: str, queries: str,
        out: str, metrics: str) -> None:
    settings = typed_view(MergeConfig, cfg)
    expected = read_table(queries, "query_features", columns=["query_id"]).column(
        "query_id").to_pylist()
    table = merge_chunks(chunks, expected)
    test_gallery = Gallery.from_parquet(gallery)
    dim = table.schema.field("query_feat").type.list_size
    if dim != test_gallery.feats.shape[1]:
        raise ArtifactError(
            f"{gallery}: gallery embeddings have size {test_gallery.feats.shape[1]} but the "
            f"chunks' query embeddings {dim} ({chunks[0]}, ...): they come from different "
            "retrievers")
    auxiliary = fusion.from_settings(settings.auxiliary_similarity, expected, test_gallery)
    if auxiliary is None:
        per_round, score = round_metrics(table, test_gallery)
    else:  # the same dialogues ranked without and with the external scores, side by side
        per_round, score = fusion.round_metrics(table, test_gallery, None)
        fused, fused_score = fusion.round_metrics(table, test_gallery, auxiliary)
    metas = [read_metadata(c) for c in chunks]
    label = next((m["label"] for m in metas if m.get("label")), method)
    result = {
        "method": method,
        "label": label,
        "queries": len(expected),
        "rounds": len(per_round) - 1,
        "per_round": per_round,
        "BRI": round(score, 4),
        "seconds": round(sum(float(m.get("seconds", 0)) for m in metas), 1),
        "chunks": len(chunks),
    }
    if auxiliary is not None:
        result["with_auxiliary"] = {"path": str(auxiliary.path), "weight": auxiliary.weight,
                                    "per_round": fused, "BRI": round(fused_score, 4)}
    tag = config_hash({"method": method, "chunks": [m.get("config_hash") for m in metas]})
    write_table(table, out, "dialogues", config_hash=tag, producer="merge-eval",
                extra_metadata={"method": method, "label": label})
    write_json(result, metrics)
    log.info("%s: R@1 %s; BRI %.3f", method,
             " -> ".join(f"{p['R1']:.1f}" for p in per_round), score)
