"""Annotation loading: every validation error names the file, the record and the field."""

from __future__ import annotations

import copy
import json

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llava_reid.data.annotations import AnnotationError, load_annotations, read_annotations, run


def _record(i: int, pid: int, split: str) -> dict:
    return {
        "id": pid,
        "split": split,
        "file_path": f"imgs/{i}.png",
        "initial_description": "I saw a man in a red top.",
        "fine-grained_description": "I saw a man with short hair in a red top and jeans.",
        "questions": ["Did he carry a bag?", "What colour were his shoes?"],
        "answers": ["No, he did not carry a bag.", "His shoes were white."],
    }


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "imgs").mkdir()
    # Train pids 40, 11, 40, 25 are not contiguous: they must map to class ids 0..2.
    layout = [(40, "train"), (11, "train"), (40, "train"), (25, "train"), (7, "val"),
              (3, "test"), (3, "test")]
    records = []
    for i, (pid, split) in enumerate(layout):
        Image.new("RGB", (8, 24), (i * 30, 0, 0)).save(tmp_path / f"imgs/{i}.png")
        records.append(_record(i, pid, split))
    records[0]["captions"] = ["a man in red"]
    return tmp_path, records


def _write(root, records):
    path = root / "annos.json"
    path.write_text(json.dumps(records))
    return path


def test_good_dataset_round_trips(dataset, tmp_path):
    root, records = dataset
    out = tmp_path / "annotations.parquet"
    run({"data": {"source": "annotations"}}, str(_write(root, records)), str(root), str(out))
    df = read_annotations(out)
    assert df.image_idx.tolist() == list(range(7))
    assert df.pid.tolist() == [40, 11, 40, 25, 7, 3, 3]
    # Sorted train pids 11, 25, 40 -> classes 0, 1, 2; other splits -1.
    assert df.class_id.tolist() == [2, 0, 2, 1, -1, -1, -1]
    assert df.captions[0].tolist() == ["a man in red"] and len(df.captions[1]) == 0
    assert df.fine_grained_description[0].startswith("I saw a man with short hair")
    assert read_annotations(out, split="test").image_idx.tolist() == [5, 6]
    assert len(pd.read_parquet(out)) == 7
    assert pq.read_table(out).num_rows == 7
    assert duckdb.sql(f"SELECT count(DISTINCT pid) FROM '{out}' WHERE split='train'").fetchall() \
        == [(3,)]


def _mutate(records, index, **changes):
    records = copy.deepcopy(records)
    for key, value in changes.items():
        if value is _DELETE:
            del records[index][key]
        else:
            records[index][key] = value
    return records


_DELETE = object()

CASES = [
    # (record index, change, expected field, message fragment)
    (2, {"id": _DELETE}, "'id'", "missing"),
    (2, {"id": "40"}, "'id'", "expected an integer"),
    (2, {"id": True}, "'id'", "expected an integer"),
    (3, {"split": "validation"}, "'split'", "unknown split 'validation'"),
    (1, {"initial_description": _DELETE}, "'initial_description'", "missing"),
    (1, {"fine-grained_description": "  "}, "'fine-grained_description'", "non-empty string"),
    (4, {"questions": "Did he carry a bag?"}, "'questions'", "list of strings"),
    (4, {"answers": ["Yes.", 3]}, "'answers'[1]", "non-empty string"),
    (5, {"answers": ["Yes, he did."]}, "'answers'", "1 answers for 2 questions"),
    (6, {"captions": [""]}, "'captions'[0]", "non-empty string"),
    (6, {"file_path": "imgs/missing.png"}, "'file_path'", "image file not found"),
    (6, {"file_path": "imgs/0.png"}, "'file_path'", "duplicate of record 0"),
]


@pytest.mark.parametrize(("index", "change", "field", "fragment"), CASES)
def test_each_error_names_file_record_and_field(dataset, index, change, field, fragment):
    root, records = dataset
    path = _write(root, _mutate(records, index, **change))
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, root)
    msg = str(err.value)
    assert str(path) in msg
    assert f"record {index}" in msg
    assert f"field {field}" in msg
    assert fragment in msg


def test_record_id_is_named_when_known(dataset):
    root, records = dataset
    path = _write(root, _mutate(records, 3, split="dev"))
    with pytest.raises(AnnotationError, match=r"record 3 \(id 25\)"):
        load_annotations(path, root)


def test_corrupt_image_is_reported(dataset):
    root, records = dataset
    (root / "imgs/5.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(AnnotationError, match=r"record 5 .*field 'file_path': image file "
                       r"unreadable"):
        load_annotations(_write(root, records), root)


def test_empty_split(dataset):
    root, records = dataset
    path = _write(root, [r for r in records if r["split"] != "val"])
    with pytest.raises(AnnotationError, match=r"annos.json: split 'val' has no records"):
        load_annotations(path, root)


def test_training_identity_in_test_split(dataset):
    root, records = dataset
    path = _write(root, _mutate(records, 5, id=40))
    with pytest.raises(AnnotationError, match=r"record 5 \(id 40\), field 'split'"):
        load_annotations(path, root)


@pytest.mark.parametrize(("content", "fragment"), [
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "expected a list of records"),
])
def test_bad_files(tmp_path, content, fragment):
    path = tmp_path / "annos.json"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=fragment):
        load_annotations(path, tmp_path)
    with pytest.raises(AnnotationError, match="not found"):
        load_annotations(tmp_path / "nope.json", tmp_path)


def test_record_that_is_not_an_object(dataset):
    root, records = dataset
    path = _write(root, [*records, ["not", "a", "record"]])
    with pytest.raises(AnnotationError, match="record 7: expected an object"):
        load_annotations(path, root)
