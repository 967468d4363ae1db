"""Interactive-PEDES annotations: validated on load, written to ``data/annotations.parquet``.

The input is the dataset's annotation JSON, a list of records::

    {"id": 123, "split": "train" | "val" | "test", "file_path": "CUHK-PEDES/imgs/...jpg",
     "initial_description": str, "fine-grained_description": str,
     "questions": [str, ...], "answers": [str, ...], "captions": [str, ...] (optional)}

Anything wrong fails with one ``AnnotationError`` naming the file, the record (index and id)
and the field. Training identities are mapped to contiguous class ids (the ID loss's classes),
whatever the raw ids are.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from llava_reid.artifacts import read_table, write_table
from llava_reid.data import SPLITS
from llava_reid.runtime import config_hash

log = logging.getLogger(__name__)

TEXT_FIELDS = ("file_path", "initial_description", "fine-grained_description")
LIST_FIELDS = ("questions", "answers")


class AnnotationError(ValueError):
    """An annotation file or record is invalid."""


def _where(path: Path, index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    ident = f" (id {rid})" if isinstance(rid, int) and not isinstance(rid, bool) else ""
    return f"{path}: record {index}{ident}"


def _check_record(path: Path, index: int, rec: Any) -> None:
    where = _where(path, index, rec)
    if not isinstance(rec, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(rec).__name__}")
    if "id" not in rec:
        raise AnnotationError(f"{where}, field 'id': missing")
    if not isinstance(rec["id"], int) or isinstance(rec["id"], bool):
        raise AnnotationError(f"{where}, field 'id': expected an integer, got {rec['id']!r}")
    if "split" not in rec:
        raise AnnotationError(f"{where}, field 'split': missing")
    if rec["split"] not in SPLITS:
        raise AnnotationError(
            f"{where}, field 'split': unknown split {rec['split']!r} (expected one of {SPLITS})"
        )
    for field in TEXT_FIELDS:
        if field not in rec:
            raise AnnotationError(f"{where}, field {field!r}: missing")
        if not isinstance(rec[field], str) or not rec[field].strip():
            raise AnnotationError(f"{where}, field {field!r}: expected a non-empty string")
    for field in (*LIST_FIELDS, "captions"):
        if field not in rec:
            if field == "captions":
                continue
            raise AnnotationError(f"{where}, field {field!r}: missing")
        value = rec[field]
        if not isinstance(value, list):
            raise AnnotationError(f"{where}, field {field!r}: expected a list of strings")
        for j, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise AnnotationError(
                    f"{where}, field {field!r}[{j}]: expected a non-empty string, got {item!r}"
                )
    if len(rec["questions"]) != len(rec["answers"]):
        raise AnnotationError(
            f"{where}, field 'answers': {len(rec['answers'])} answers for "
            f"{len(rec['questions'])} questions"
        )


def _image_problem(file: Path) -> str | None:
    if not file.is_file():
        return "image file not found"
    try:
        with Image.open(file) as img:
            img.verify()
        with Image.open(file) as img:  # verify() does not decode pixel data
            img.load()
    except Exception as exc:  # PIL raises many types for broken files
        return f"image file unreadable ({exc.__class__.__name__}: {exc})"
    return None


def load_annotations(json_path: str | os.PathLike, image_root: str | os.PathLike,
                     check_images: bool = True) -> pd.DataFrame:
    """Read and validate the annotation JSON; the artifact's columns, in file order."""
    path, root = Path(json_path), Path(image_root)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a list of records, got {type(records).__name__}")
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        _check_record(path, i, rec)
        fp = rec["file_path"]
        if fp in seen:
            raise AnnotationError(
                f"{_where(path, i, rec)}, field 'file_path': duplicate of record {seen[fp]} ({fp})"
            )
        seen[fp] = i
    for split in SPLITS:
        if not any(r["split"] == split for r in records):
            raise AnnotationError(f"{path}: split {split!r} has no records")
    if check_images:
        workers = min(32, 4 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            problems = pool.map(_image_problem, (root / r["file_path"] for r in records))
            for i, problem in enumerate(problems):
                if problem:
                    rec = records[i]
                    raise AnnotationError(
                        f"{_where(path, i, rec)}, field 'file_path': {problem}: "
                        f"{root / rec['file_path']}"
                    )

    train_pids = sorted({r["id"] for r in records if r["split"] == "train"})
    class_of = {pid: c for c, pid in enumerate(train_pids)}
    pid_split: dict[int, str] = {}
    for i, r in enumerate(records):
        other = pid_split.setdefault(r["id"], r["split"])
        if other != r["split"] and "train" in (other, r["split"]):
            raise AnnotationError(
                f"{_where(path, i, r)}, field 'split': identity {r['id']} appears in both "
                f"{other!r} and {r['split']!r}; training identities must not be evaluated"
            )
    return pd.DataFrame({
        "image_idx": range(len(records)),
        "pid": [r["id"] for r in records],
        "class_id": [class_of[r["id"]] if r["split"] == "train" else -1 for r in records],
        "split": [r["split"] for r in records],
        "file_path": [r["file_path"] for r in records],
        "initial_description": [r["initial_description"] for r in records],
        "fine_grained_description": [r["fine-grained_description"] for r in records],
        "questions": [list(r["questions"]) for r in records],
        "answers": [list(r["answers"]) for r in records],
        "captions": [list(r.get("captions", [])) for r in records],
    })


def read_annotations(parquet_path: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """The annotations artifact as a DataFrame (optionally one split), in image_idx order."""
    table = read_table(parquet_path, "annotations").to_pandas()
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        table = table[table.split == split]
    return table.sort_values("image_idx").reset_index(drop=True)


def run(cfg: dict[str, Any], annotations: str, image_root: str, out: str) -> None:
    fmt = (cfg.get("data") or {}).get("format") or "interactive-pedes"
    extra = {"source": str(annotations)}
    if fmt == "interactive-pedes":
        table = load_annotations(annotations, image_root)
    else:  # a caption benchmark (transfer): one query per caption
        from llava_reid.data.caption_datasets import QUERY_SOURCE, load_caption_dataset

        table = load_caption_dataset(annotations, image_root, fmt)
        extra |= {"format": fmt, "queries": QUERY_SOURCE}
    write_table(table, out, "annotations", config_hash=config_hash(cfg.get("data")),
                producer="load-annotations", extra_metadata=extra)
    for split in SPLITS:
        part = table[table.split == split]
        log.info("%s: %d images, %d identities, %.1f Q/A and %.1f captions per image", split,
                 len(part), part.pid.nunique(), part.questions.map(len).mean(),
                 part.captions.map(len).mean())


def training_corpus(annotations: str) -> list[str]:
    """All text of the training split: descriptions, questions and answers."""
    table = read_table(annotations, "annotations").to_pandas()
    train = table[table["split"] == "train"]
    corpus: list[str] = []
    for row in train.itertuples():
        corpus += [row.initial_description, row.fine_grained_description]
        corpus += list(row.questions) + list(row.answers)
    return corpus
