"""The standard text-to-person benchmarks, as people have them on disk, validated into
``data/annotations.parquet``.

Three layouts (the ones IRRA's dataset readers take), each one JSON list of image records:

- ``cuhk-pedes``: ``CUHK-PEDES/reid_raw.json``, images under ``CUHK-PEDES/imgs/``::

    {"split": "train" | "val" | "test", "captions": [str, ...], "file_path": "CUHK01/x.png",
     "processed_tokens": [[str, ...], ...] (ignored), "id": 1}

- ``icfg-pedes``: ``ICFG-PEDES/ICFG-PEDES.json``, images under ``ICFG-PEDES/imgs/``; the same
  fields without ``processed_tokens`` (its splits are train and test only);
- ``rstpreid``: ``RSTPReid/data_captions.json``, images under ``RSTPReid/imgs/``::

    {"id": 0, "img_path": "0000_c14_0031.jpg", "captions": [str, ...], "split": "test"}

These datasets have captions, not dialogues: every caption of an image becomes one initial
query of that image (``captions``; the first is also ``initial_description``), and the
witness's written memory and the annotated Q/A pairs stay empty, so a transfer run evaluates
with an answerer that looks at the target image. Only the test split is required (evaluation
reads nothing else). Anything wrong fails with one ``AnnotationError`` naming the file, the
record (index and id) and the field, before anything is written.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from llava_reid.data import SPLITS
from llava_reid.data.annotations import AnnotationError, _image_problem

# format -> (the record field holding the image path, the file name IRRA reads)
FORMATS: dict[str, tuple[str, str]] = {
    "cuhk-pedes": ("file_path", "reid_raw.json"),
    "icfg-pedes": ("file_path", "ICFG-PEDES.json"),
    "rstpreid": ("img_path", "data_captions.json"),
}
QUERY_SOURCE = "captions"  # the annotations' metadata: one query per caption (not per image)


def _where(path: Path, index: int, rec: Any) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    ident = f" (id {rid!r})" if isinstance(rid, (int, str)) and not isinstance(rid, bool) else ""
    return f"{path}: record {index}{ident}"


def _identity(where: str, value: Any) -> int:
    """Identity numbers are integers; IRRA also takes digit strings (``int(anno['id'])``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AnnotationError(f"{where}, field 'id': expected an integer, got {value!r}")
    if isinstance(value, str):
        if not value.strip().lstrip("-").isdigit():
            raise AnnotationError(f"{where}, field 'id': expected an integer, got {value!r}")
        return int(value)
    return value


def _check_record(path: Path, index: int, rec: Any, path_field: str) -> int:
    """Validate one record; returns its identity."""
    where = _where(path, index, rec)
    if not isinstance(rec, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(rec).__name__}")
    for field in ("id", "split", path_field, "captions"):
        if field not in rec:
            raise AnnotationError(f"{where}, field {field!r}: missing")
    pid = _identity(where, rec["id"])
    if rec["split"] not in SPLITS:
        raise AnnotationError(
            f"{where}, field 'split': unknown split {rec['split']!r} (expected one of {SPLITS})")
    if not isinstance(rec[path_field], str) or not rec[path_field].strip():
        raise AnnotationError(f"{where}, field {path_field!r}: expected a non-empty string")
    captions = rec["captions"]
    if not isinstance(captions, list) or not captions:
        raise AnnotationError(f"{where}, field 'captions': expected a non-empty list of strings")
    for j, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise AnnotationError(
                f"{where}, field 'captions'[{j}]: expected a non-empty string, got {caption!r}")
    return pid


def load_caption_dataset(json_path: str | os.PathLike, image_root: str | os.PathLike,
                         fmt: str, check_images: bool = True) -> pd.DataFrame:
    """Read and validate one benchmark's annotation JSON; the annotations artifact's columns,
    in file order (``image_idx`` = the record's position in the file)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown caption dataset format {fmt!r}; expected one of "
                         f"{sorted(FORMATS)}")
    path_field, _ = FORMATS[fmt]
    path, root = Path(json_path), Path(image_root)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a list of records, got {type(records).__name__}")
    pids, seen = [], {}
    for i, rec in enumerate(records):
        pids.append(_check_record(path, i, rec, path_field))
        fp = rec[path_field]
        if fp in seen:
            raise AnnotationError(
                f"{_where(path, i, rec)}, field {path_field!r}: duplicate of record {seen[fp]} "
                f"({fp})")
        seen[fp] = i
    if not any(r["split"] == "test" for r in records):
        raise AnnotationError(f"{path}: split 'test' has no records (a transfer run evaluates "
                              f"the test split)")
    pid_split: dict[int, str] = {}
    for i, (rec, pid) in enumerate(zip(records, pids, strict=True)):
        other = pid_split.setdefault(pid, rec["split"])
        if other != rec["split"] and "train" in (other, rec["split"]):
            raise AnnotationError(
                f"{_where(path, i, rec)}, field 'split': identity {pid} appears in both "
                f"{other!r} and {rec['split']!r}; training identities must not be evaluated")
    if check_images:
        workers = min(32, 4 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            problems = pool.map(_image_problem, (root / r[path_field] for r in records))
            for i, problem in enumerate(problems):
                if problem:
                    rec = records[i]
                    raise AnnotationError(
                        f"{_where(path, i, rec)}, field {path_field!r}: {problem}: "
                        f"{root / rec[path_field]}")

    train_pids = sorted({p for p, r in zip(pids, records, strict=True) if r["split"] == "train"})
    class_of = {pid: c for c, pid in enumerate(train_pids)}
    return pd.DataFrame({
        "image_idx": range(len(records)),
        "pid": pids,
        "class_id": [class_of[p] if r["split"] == "train" else -1
                     for p, r in zip(pids, records, strict=True)],
        "split": [r["split"] for r in records],
        "file_path": [r[path_field] for r in records],
        "initial_description": [r["captions"][0].strip() for r in records],
        "fine_grained_description": ["" for _ in records],
        "questions": [[] for _ in records],
        "answers": [[] for _ in records],
        "captions": [[c.strip() for c in r["captions"]] for r in records],
    })
