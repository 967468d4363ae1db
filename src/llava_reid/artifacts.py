"""Artifact schemas and atomic writers/readers.

Every Parquet file the workflow produces is declared here, once. Embedding columns are
``fixed_size_list<float32, D>`` (D is read from the data); ids are integers. Each file carries
key-value metadata: the artifact kind, the hash of the config section that produced it and the
producing model. Writers write to a temporary name in the same folder and rename, so an
interrupted job never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llava_reid import __version__

EMBEDDING = "embedding"  # marker type: fixed_size_list<float32, D>, D taken from the data

# kind -> list of (column, type). EMBEDDING columns accept any fixed size.
SCHEMAS: dict[str, list[tuple[str, Any]]] = {
    "annotations": [
        ("image_idx", pa.int32()),
        ("pid", pa.int64()),
        ("class_id", pa.int32()),  # contiguous 0..C-1 on the train split, -1 elsewhere
        ("split", pa.string()),
        ("file_path", pa.string()),
        ("initial_description", pa.string()),
        ("fine_grained_description", pa.string()),
        ("questions", pa.list_(pa.string())),
        ("answers", pa.list_(pa.string())),
        ("captions", pa.list_(pa.string())),
    ],
    "gallery_features": [
        ("image_idx", pa.int32()),
        ("pid", pa.int64()),
        ("file_path", pa.string()),
        ("feat", EMBEDDING),
    ],
    "query_features": [
        ("query_id", pa.int32()),  # image_idx, or the caption's number (caption benchmarks)
        ("image_idx", pa.int32()),  # the target image the description was written for
        ("pid", pa.int64()),
        ("initial_description", pa.string()),
        ("initial_feat", EMBEDDING),
        ("fine_grained_feat", EMBEDDING),
    ],
    "oracle_plan": [
        ("image_idx", pa.int32()),
        ("pid", pa.int64()),
        ("round", pa.int8()),  # 0-based; round r adds the r-th chosen answer
        ("answer_index", pa.int16()),  # the look-ahead's choice: index into the Q/A pairs
        ("followed_index", pa.int16()),  # the answer the dialogue went on with
        ("random_history", pa.bool_()),  # True: followed a random answer (not the choice)
        ("rank_before", pa.int32()),  # 1-based rank of the target before this round's answer
        ("rank_after", pa.int32()),  # ... and after it
    ],
    "conversations": [
        ("example_id", pa.int64()),
        ("image_idx", pa.int32()),
        ("pid", pa.int64()),
        ("round", pa.int8()),
        ("initial_description", pa.string()),
        ("history_questions", pa.list_(pa.string())),
        ("history_answers", pa.list_(pa.string())),
        ("description", pa.string()),  # retriever query so far: initial + cleaned answers
        ("target_question", pa.string()),
        ("target_answer_index", pa.int16()),
        ("template_id", pa.int8()),
        ("idk_augmented", pa.bool_()),
        ("pool", pa.list_(pa.int32())),  # top-N retrieval pool, image_idx in rank order
    ],
    "dialogues": [
        ("query_id", pa.int32()),
        ("pid", pa.int64()),
        ("round", pa.int8()),  # 0 = initial query only; r >= 1 after the r-th answer
        ("query", pa.string()),  # retriever query text used for this round's ranking
        ("target_rank", pa.int32()),
        ("top_k", pa.list_(pa.int32())),  # top-10 gallery image_idx of this round's ranking
        ("candidates", pa.list_(pa.int32())),  # images shown to the questioner (r < rounds)
        ("seen_images", pa.list_(pa.int32())),  # images the questioner call actually embedded
        ("question", pa.string()),
        ("answer", pa.string()),
        ("query_feat", EMBEDDING),
    ],
    "answers_cache": [
        ("target_id", pa.int32()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answerer", pa.string()),
    ],
}


class ArtifactError(ValueError):
    """An artifact is missing, unreadable or does not match its declared schema."""


def _is_embedding(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_float32(t.value_type)


def schema_for(kind: str, dims: dict[str, int] | None = None) -> pa.Schema:
    """The declared schema of ``kind``; embedding sizes from ``dims`` (column -> D)."""
    if kind not in SCHEMAS:
        raise KeyError(f"unknown artifact kind {kind!r}; known: {sorted(SCHEMAS)}")
    dims = dims or {}
    fields = []
    for name, typ in SCHEMAS[kind]:
        if typ is EMBEDDING:
            if name not in dims:
                raise ValueError(f"{kind}: embedding column {name!r} needs its size")
            typ = pa.list_(pa.float32(), int(dims[name]))
        fields.append(pa.field(name, typ))
    return pa.schema(fields)


def _metadata(kind: str, config_hash: str, producer: str, extra: dict[str, Any] | None):
    meta = {
        "llava_reid.kind": kind,
        "llava_reid.config_hash": config_hash,
        "llava_reid.producer": producer,
        "llava_reid.version": __version__,
    }
    for k, v in (extra or {}).items():
        meta[f"llava_reid.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return {k.encode(): v.encode() for k, v in meta.items()}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_table(
    table: pa.Table | Any,
    path: str | os.PathLike,
    kind: str,
    *,
    config_hash: str,
    producer: str,
    extra_metadata: dict[str, Any] | None = None,
) -> pa.Table:
    """Cast ``table`` (a pyarrow Table, a pandas DataFrame or a dict of columns) to the declared
    schema of ``kind`` and write it atomically to ``path``. Returns the written table."""
    if not isinstance(table, pa.Table):
        table = (
            pa.Table.from_pydict(table)
            if isinstance(table, dict)
            else pa.Table.from_pandas(table, preserve_index=False)
        )
    dims = {}
    for name, typ in SCHEMAS[kind]:
        if typ is EMBEDDING:
            if name not in table.column_names:
                raise ArtifactError(f"{path}: column {name!r} missing for artifact {kind!r}")
            col_type = table.schema.field(name).type
            if pa.types.is_fixed_size_list(col_type):
                dims[name] = col_type.list_size
            else:
                first = next((v for v in table.column(name).to_pylist() if v is not None), None)
                if first is None and table.num_rows:
                    raise ArtifactError(f"{path}: column {name!r} has no values to size it")
                dims[name] = len(first) if first is not None else 1
    schema = schema_for(kind, dims)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ArtifactError(f"{path}: columns {missing} missing for artifact {kind!r}")
    table = table.select(schema.names).cast(schema)
    table = table.replace_schema_metadata(_metadata(kind, config_hash, producer, extra_metadata))
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return table


def read_table(path: str | os.PathLike, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read ``path`` and check it against the declared schema of ``kind``."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: artifact {kind!r} not found")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise ArtifactError(f"{path}: not a readable Parquet file ({exc})") from exc
    for name, typ in SCHEMAS[kind]:
        if name not in schema.names:
            raise ArtifactError(f"{path}: column {name!r} missing (artifact {kind!r})")
        got = schema.field(name).type
        ok = _is_embedding(got) if typ is EMBEDDING else got.equals(typ)
        if not ok:
            want = "fixed_size_list<float32>" if typ is EMBEDDING else str(typ)
            raise ArtifactError(f"{path}: column {name!r} has type {got}, expected {want}")
    stored_kind = (schema.metadata or {}).get(b"llava_reid.kind", b"").decode()
    if stored_kind and stored_kind != kind:
        raise ArtifactError(f"{path}: holds artifact {stored_kind!r}, expected {kind!r}")
    return pq.read_table(path, columns=columns)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The llava_reid.* key-value metadata of a Parquet artifact, without the prefix."""
    meta = pq.read_schema(path).metadata or {}
    out = {}
    for k, v in meta.items():
        key = k.decode()
        if key.startswith("llava_reid."):
            out[key.removeprefix("llava_reid.")] = v.decode()
    return out


def embeddings(table: pa.Table, column: str):
    """A fixed-size-list column as a float32 numpy array [N, D] (zero-copy where possible)."""
    import numpy as np

    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, dim
    )
