"""Auxiliary similarity: the fused ranking's values, the id checks, the export CLI and the
side-by-side metrics."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llava_reid.artifacts import write_table
from llava_reid.dialogue import merge
from llava_reid.dialogue.fusion import AuxiliarySimilarity, AuxiliarySimilarityError, export
from llava_reid.report.plots import load_metrics
from llava_reid.retriever.features import embedding_column
from llava_reid.retriever.gallery import Gallery

# Gallery: 3 images (image_idx 10, 11, 12 of identities 1, 2, 3); queries 0, 1 (caption ids).
GALLERY_FEATS = np.eye(3, 4, dtype=np.float32)
QUERY_FEATS = np.array([[0.9, 0.1, 0.0, 0.0], [0.0, 0.6, 0.8, 0.0]], np.float32)
QUERY_FEATS /= np.linalg.norm(QUERY_FEATS, axis=1, keepdims=True)
AUX = np.array([[0.0, 0.0, 2.0],   # query 0: the external model prefers image 12
                [1.0, 0.0, 0.0]], np.float32)


def _gallery(tmp_path) -> tuple[str, Gallery]:
    path = tmp_path / "test_gallery.parquet"
    write_table({"image_idx": [10, 11, 12], "pid": [1, 2, 3], "file_path": ["a", "b", "c"],
                 "feat": embedding_column(GALLERY_FEATS)}, path, "gallery_features",
                config_hash="t", producer="test")
    return str(path), Gallery.from_parquet(str(path))


def _queries(tmp_path) -> str:
    path = tmp_path / "test_queries.parquet"
    write_table({"query_id": [0, 1], "image_idx": [10, 12], "pid": [1, 3],
                 "initial_description": ["a", "b"], "initial_feat": embedding_column(QUERY_FEATS),
                 "fine_grained_feat": embedding_column(QUERY_FEATS)}, path, "query_features",
                config_hash="t", producer="test")
    return str(path)


def _long(tmp_path, rows, name="aux.parquet") -> str:
    path = tmp_path / name
    q, g, s = zip(*rows, strict=True) if rows else ((), (), ())
    pq.write_table(pa.table({"query_id": pa.array(q, pa.int64()),
                             "image_idx": pa.array(g, pa.int64()),
                             "score": pa.array(s, pa.float64())}), path)
    return str(path)


def _aux_rows(order=(10, 11, 12)):
    col = {10: 0, 11: 1, 12: 2}
    return [(q, g, float(AUX[q, col[g]])) for q in (1, 0) for g in order]


def test_fused_similarity_values_and_ranking(tmp_path):
    _, gallery = _gallery(tmp_path)
    aux = AuxiliarySimilarity(_long(tmp_path, _aux_rows((12, 10, 11))), 0.25, [0, 1], gallery)
    feats = torch.from_numpy(QUERY_FEATS)
    sim = gallery.similarity(feats)
    fused = aux.fuse(sim, [0, 1])
    np.testing.assert_allclose(fused.numpy(), 0.75 * sim.numpy() + 0.25 * AUX, rtol=1e-6)
    # Rows follow the ids asked for, not the file's order.
    np.testing.assert_allclose(aux.fuse(sim.flip(0), [1, 0]).numpy(), fused.flip(0).numpy(),
                               rtol=1e-6)
    ranks, pools = aux.rank(gallery, feats, [0, 1], torch.tensor([1, 3]), k=3)
    # Query 0: 0.75*0.994 = 0.745 vs image 12: 0.5 -> still first. Query 1: image 12 scores
    # 0.75*0.8 = 0.6 vs image 10: 0.25 and image 11: 0.45 -> first.
    assert ranks == [1, 1]
    assert pools.tolist() == [[0, 2, 1], [2, 1, 0]]
    heavy = AuxiliarySimilarity(_long(tmp_path, _aux_rows()), 0.75, [0, 1], gallery)
    ranks, pools = heavy.rank(gallery, feats, [0, 1], torch.tensor([1, 3]), k=2)
    # With w = 0.75 the external scores win: query 0 -> image 12 first, query 1 -> image 10.
    assert ranks == [2, 2] and pools.tolist() == [[2, 0], [0, 2]]


def test_dense_npz_equals_long_parquet(tmp_path):
    _, gallery = _gallery(tmp_path)
    dense = tmp_path / "aux.npz"
    # Columns in another order than the gallery's: aligned by image_idx.
    np.savez(dense, similarity=AUX[::-1][:, [2, 0, 1]], query_id=np.array([1, 0]),
             image_idx=np.array([12, 10, 11]))
    a = AuxiliarySimilarity(dense, 0.5, [0, 1], gallery)
    b = AuxiliarySimilarity(_long(tmp_path, _aux_rows()), 0.5, [0, 1], gallery)
    sim = gallery.similarity(torch.from_numpy(QUERY_FEATS))
    np.testing.assert_array_equal(a.fuse(sim, [0, 1]).numpy(), b.fuse(sim, [0, 1]).numpy())


@pytest.mark.parametrize(("rows", "message"), [
    (lambda r: r[:-1], r"no score for \(query_id 0, image_idx 12\)"),
    (lambda r: [*r, r[0]], r"pair \(query_id 1, image_idx 10\) appears more than once"),
    (lambda r: [*r, (0, 99, 1.0)], r"image_idx \[99\] are not test gallery images"),
    (lambda r: [x for x in r if x[0] == 0], r"missing \[1\], unknown \[\]"),
    (lambda r: [*r, *[(5, g, 0.0) for g in (10, 11, 12)]], r"missing \[\], unknown \[5\]"),
])
def test_ids_must_match_the_test_split(tmp_path, rows, message):
    _, gallery = _gallery(tmp_path)
    path = _long(tmp_path, rows(_aux_rows()))
    with pytest.raises(AuxiliarySimilarityError, match=message) as info:
        AuxiliarySimilarity(path, 0.5, [0, 1], gallery)
    assert path in str(info.value)


def test_bad_files_and_weights(tmp_path):
    _, gallery = _gallery(tmp_path)
    dense = tmp_path / "aux.npz"
    np.savez(dense, similarity=AUX, query_id=np.array([0, 1]), image_idx=np.array([10, 11]))
    with pytest.raises(AuxiliarySimilarityError, match=r"shape \(2, 3\), expected \(2, 2\)"):
        AuxiliarySimilarity(dense, 0.5, [0, 1], gallery)
    np.savez(dense, similarity=AUX[:, :2], query_id=np.array([0, 1]),
             image_idx=np.array([10, 11]))
    with pytest.raises(AuxiliarySimilarityError, match=r"missing \[12\], unknown \[\]"):
        AuxiliarySimilarity(dense, 0.5, [0, 1], gallery)
    np.savez(dense, scores=AUX)
    with pytest.raises(AuxiliarySimilarityError, match="arrays .* missing"):
        AuxiliarySimilarity(dense, 0.5, [0, 1], gallery)
    with pytest.raises(AuxiliarySimilarityError, match="not found"):
        AuxiliarySimilarity(tmp_path / "none.parquet", 0.5, [0, 1], gallery)
    with pytest.raises(AuxiliarySimilarityError, match="weight = 1.5"):
        AuxiliarySimilarity(_long(tmp_path, _aux_rows()), 1.5, [0, 1], gallery)
    (tmp_path / "broken.parquet").write_text("no")
    with pytest.raises(AuxiliarySimilarityError, match="not a readable Parquet file"):
        AuxiliarySimilarity(tmp_path / "broken.parquet", 0.5, [0, 1], gallery)


def test_export_roundtrip_reproduces_our_ranking(tmp_path):
    gallery_path, gallery = _gallery(tmp_path)
    queries = _queries(tmp_path)
    out = tmp_path / "ours.parquet"
    export({}, gallery_path, queries, str(out))
    table = pq.read_table(out).to_pandas()
    assert len(table) == 6 and list(table.columns) == ["query_id", "image_idx", "score"]
    own = AuxiliarySimilarity(out, 1.0, [0, 1], gallery)
    sim = gallery.similarity(torch.from_numpy(QUERY_FEATS))
    np.testing.assert_allclose(own.fuse(torch.zeros_like(sim), [0, 1]).numpy(), sim.numpy(),
                               rtol=1e-6)


def _dialogues(tmp_path) -> str:
    """Two rounds of the two queries: round 0 the caption, round 1 a better query for 1."""
    feats = np.concatenate([QUERY_FEATS, [QUERY_FEATS[0]], [[0, 0, 1, 0]]]).astype(np.float32)
    path = tmp_path / "chunk.parquet"
    write_table({"query_id": [0, 1, 0, 1], "pid": [1, 3, 1, 3], "round": [0, 0, 1, 1],
                 "query": ["a", "b", "a", "b c"], "target_rank": [1, 1, 1, 1],
                 "top_k": [[10]] * 4, "candidates": [[]] * 4, "seen_images": [[]] * 4,
                 "question": ["q", "q", "", ""], "answer": ["x", "c", "", ""],
                 "query_feat": embedding_column(feats)}, path, "dialogues", config_hash="t",
                producer="test")
    return str(path)


def test_merge_reports_with_and_without_auxiliary(tmp_path):
    gallery_path, _ = _gallery(tmp_path)
    queries = _queries(tmp_path)
    chunk = _dialogues(tmp_path)
    aux = _long(tmp_path, _aux_rows())
    plain = tmp_path / "plain.json"
    merge.run({}, "questioner", [chunk], gallery_path, queries, str(tmp_path / "d0.parquet"),
              str(plain))
    fused = tmp_path / "fused.json"
    cfg = {"evaluate": {"auxiliary_similarity": {"path": aux, "weight": 0.75}}}
    merge.run(cfg, "questioner", [chunk], gallery_path, queries, str(tmp_path / "d1.parquet"),
              str(fused))
    a, b = json.loads(plain.read_text()), json.loads(fused.read_text())
    assert "with_auxiliary" not in a
    assert b["per_round"] == a["per_round"] and b["BRI"] == a["BRI"]
    side = b["with_auxiliary"]
    assert side["weight"] == 0.75 and side["path"] == aux
    # w = 0.75 puts both targets second in round 0; in round 1 query 1 (now exactly image 12)
    # scores 0.25 for its target vs 0.75 for image 10 -> still second; query 0 likewise.
    assert [p["R1"] for p in side["per_round"]] == [0.0, 0.0]
    assert [p["R1"] for p in a["per_round"]] == [100.0, 100.0]
    rows = load_metrics([str(fused)])
    assert [m["method"] for m in rows] == ["questioner", "questioner+auxiliary"]
    assert rows[1]["label"].endswith("+ auxiliary (w=0.75)")
    assert rows[1]["per_round"][0]["R1"] == 0.0
