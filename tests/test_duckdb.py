"""The README's DuckDB recipes on feature files written by the real writer: what type DuckDB
sees for an embedding column, the cast, and the similarity query exactly as the README prints
it (its paths pointed at a temporary run), checked against NumPy."""

from __future__ import annotations

import re

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from llava_reid.artifacts import write_table
from llava_reid.retriever.features import embedding_column
from tests.conftest import REPO

DIM = 128  # the README's query casts to FLOAT[128], the embedded default's embed_dim
RUN = "results/embedded/features"


def readme_sql() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "expected one SQL example in the README"
    return blocks[0]


@pytest.fixture
def features(tmp_path):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((12, DIM)).astype(np.float32)
    initial = rng.standard_normal((6, DIM)).astype(np.float32)
    out = tmp_path / RUN
    out.mkdir(parents=True)
    meta = {"embed_dim": DIM}
    write_table(pa.table({
        "image_idx": pa.array(np.arange(100, 112), pa.int32()),
        "pid": pa.array(np.arange(12) // 2, pa.int64()),
        "file_path": pa.array([f"img/{i}.png" for i in range(12)]),
        "feat": embedding_column(gallery),
    }), out / "test_gallery.parquet", "gallery_features", config_hash="t", producer="test",
        extra_metadata=meta)
    write_table(pa.table({
        "query_id": pa.array(np.arange(105, 111), pa.int32()),
        "pid": pa.array(np.arange(6), pa.int64()),
        "image_idx": pa.array(np.arange(100, 106), pa.int32()),
        "initial_description": pa.array(["a person"] * 6),
        "initial_feat": embedding_column(initial),
        "fine_grained_feat": embedding_column(initial[::-1].copy()),
    }), out / "test_queries.parquet", "query_features", config_hash="t", producer="test",
        extra_metadata=meta)
    return {"root": tmp_path, "gallery": gallery, "initial": initial}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (b @ a) / (np.linalg.norm(a) * np.linalg.norm(b, axis=1))


def test_duckdb_sees_float_list_and_the_cast_gives_an_array(features):
    path = features["root"] / RUN / "test_gallery.parquet"
    types = {row[0]: row[1] for row in duckdb.sql(f"DESCRIBE SELECT * FROM '{path}'").fetchall()}
    assert types["feat"] == "FLOAT[]"  # the README explains why, and the cast below
    cast = duckdb.sql(f"DESCRIBE SELECT feat::FLOAT[{DIM}] AS feat FROM '{path}'").fetchall()
    assert cast[0][1] == f"FLOAT[{DIM}]"
    with pytest.raises(duckdb.BinderException):
        duckdb.sql(f"SELECT array_cosine_similarity(feat, feat) FROM '{path}'").fetchall()
    dim = duckdb.sql(f"SELECT decode(value) FROM parquet_kv_metadata('{path}') "
                     "WHERE key = 'llava_reid.embed_dim'").fetchall()
    assert dim == [(str(DIM),)]


def test_readme_similarity_query_ranks_like_numpy(features, monkeypatch):
    monkeypatch.chdir(features["root"])
    rows = duckdb.sql(readme_sql()).fetchall()
    query = features["initial"][0]  # query_id 105 is the smallest
    sims = _cosine(query, features["gallery"])
    top = np.argsort(-sims)[:5]
    assert [r[0] for r in rows] == [100 + int(i) for i in top]
    assert [r[1] for r in rows] == [int(i) // 2 for i in top]
    np.testing.assert_allclose([r[2] for r in rows], sims[top], rtol=1e-5)


def test_list_cosine_similarity_needs_no_cast(features, monkeypatch):
    monkeypatch.chdir(features["root"])
    sql = readme_sql().replace(f"q.initial_feat::FLOAT[{DIM}]", "q.initial_feat").replace(
        f"g.feat::FLOAT[{DIM}]", "g.feat").replace("array_cosine_similarity",
                                                   "list_cosine_similarity")
    assert duckdb.sql(sql).fetchall() == duckdb.sql(readme_sql()).fetchall()
