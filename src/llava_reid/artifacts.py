"""Artifact schemas and atomic writers/readers.

Every Parquet file the workflow produces is declared here, once. Embedding columns are
``fixed_size_list<float32, D>`` (D is read from the data); ids are integers. Each file carries
key-value metadata: the artifact kind, the hash of the config section that produced it and the
producing model. Writers write to a temporary name in the same folder and rename, so an
interrupted job never leaves a file that looks complete; what they write gets the permissions
the umask gives (not the 0600/0700 of a temporary name). Parquet files carry page checksums,
verified on every read, so a corrupted file is an error naming it, never different numbers.
"""

from __future__ import annotations

import contextlib
import errno
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
        # ln(rank before) - ln(rank after) of the target question's answer in this state
        ("label_gain", pa.float32()),
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

# A person's dialogue with the trained system (llava_reid.witness): the evaluation's dialogue
# rows plus who answered, the session and the image the person picked (-1: none).
SCHEMAS["witness_dialogues"] = [
    *SCHEMAS["dialogues"],
    ("answered_by", pa.string()),
    ("session_id", pa.string()),
    ("picked", pa.int32()),
]
# kind -> the kind whose schema it extends: it reads as that kind too (merged and scored alike).
EXTENDS = {"witness_dialogues": "dialogues"}


class ArtifactError(ValueError):
    """An artifact is missing, unreadable, corrupted or does not match its declared schema."""


class ArtifactWriteError(OSError):
    """An artifact could not be written (disk full, read-only or not permitted); nothing of it
    is left behind. ``errno`` is the underlying error's."""


# Errors that mean "this file system will not take the artifact", not a bug. A full disk can
# surface anywhere while writing; the folder errors only where the folder is written.
_DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
}
_FOLDER_ERRNOS = {
    **_DISK_ERRNOS,
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


@contextlib.contextmanager
def _naming_write_errors(path: Path, reasons: dict[int, str]) -> Iterator[None]:
    """Turn a full disk or a read-only/forbidden folder into an error naming ``path``."""
    try:
        yield
    except ArtifactWriteError:
        raise
    except OSError as exc:
        reason = reasons.get(exc.errno)
        if reason is None:
            raise
        raise ArtifactWriteError(exc.errno, f"{path}: cannot write: {reason}") from exc


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_up(path: Path, directory: bool) -> None:
    """Give a mkstemp/mkdtemp result the mode a plain open()/mkdir() would have had."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


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
    with _naming_write_errors(path, _FOLDER_ERRNOS):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp",
                                   dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
    try:
        _open_up(tmp, directory=False)
        with _naming_write_errors(path, _DISK_ERRNOS):
            yield tmp
        with _naming_write_errors(path, _FOLDER_ERRNOS):
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    with _naming_write_errors(path, _FOLDER_ERRNOS):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _open_up(tmp, directory=True)
        with _naming_write_errors(path, _DISK_ERRNOS):
            yield tmp
        with _naming_write_errors(path, _FOLDER_ERRNOS):
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
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
        pq.write_table(table, tmp, write_page_checksum=True)
    return table


def read_table(path: str | os.PathLike, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read ``path`` and check it against the declared schema of ``kind``."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: artifact {kind!r} not found")
    schema = _read_schema(path)
    for name, typ in SCHEMAS[kind]:
        if name not in schema.names:
            raise ArtifactError(f"{path}: column {name!r} missing (artifact {kind!r})")
        got = schema.field(name).type
        ok = _is_embedding(got) if typ is EMBEDDING else got.equals(typ)
        if not ok:
            want = "fixed_size_list<float32>" if typ is EMBEDDING else str(typ)
            raise ArtifactError(f"{path}: column {name!r} has type {got}, expected {want}")
    stored_kind = (schema.metadata or {}).get(b"llava_reid.kind", b"").decode()
    if stored_kind and kind not in (stored_kind, EXTENDS.get(stored_kind)):
        raise ArtifactError(f"{path}: holds artifact {stored_kind!r}, expected {kind!r}")
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:  # checksum, decompression or framing errors
        raise ArtifactError(
            f"{path}: corrupted Parquet artifact {kind!r} ({exc}); delete it so that it is "
            "rebuilt") from exc


def _read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:  # pyarrow raises several types for a broken file
        raise ArtifactError(f"{path}: not a readable Parquet file ({exc})") from exc


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The llava_reid.* key-value metadata of a Parquet artifact, without the prefix."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: artifact not found")
    meta = _read_schema(path).metadata or {}
    out = {}
    for k, v in meta.items():
        key = k.decode()
        if key.startswith("llava_reid."):
            out[key.removeprefix("llava_reid.")] = v.decode()
    return out


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Name ``path`` in any failure to load it (a truncated or corrupted safetensors file, a
    model folder missing a file): safetensors and transformers do not say which file."""
    try:
        yield
    except (ArtifactError, ArtifactWriteError):
        raise
    except Exception as exc:  # safetensors, transformers and torch raise many types
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            raise
        if type(exc).__name__ not in _LOAD_ERRORS and not isinstance(exc, OSError | ValueError):
            raise
        raise ArtifactError(f"{path}: cannot load {what} ({type(exc).__name__}: {exc})") from exc


# Error types that mean "this file is broken" when raised while loading it.
_LOAD_ERRORS = {"SafetensorError", "HeaderTooLarge", "UnpicklingError", "EOFError",
                "JSONDecodeError", "UnicodeDecodeError", "KeyError", "RuntimeError"}


def embeddings(table: pa.Table, column: str):
    """A fixed-size-list column as a float32 numpy array [N, D] (zero-copy where possible)."""
    import numpy as np

    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, dim
    )
