"""The caption benchmarks' loaders (CUHK-PEDES, ICFG-PEDES, RSTPReid) on hand-made samples in
the documented layouts, and the queries they give (one per caption)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llava_reid.artifacts import read_metadata, read_table
from llava_reid.data import annotations as annotations_mod
from llava_reid.data.annotations import AnnotationError, read_annotations
from llava_reid.data.caption_datasets import load_caption_dataset
from llava_reid.data.queries import query_source, split_queries


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 32), colour).save(path)


def cuhk_sample(root: Path) -> Path:
    """CUHK-PEDES/reid_raw.json + CUHK-PEDES/imgs/, 1-based ids, processed_tokens present."""
    data = root / "CUHK-PEDES"
    records = [
        {"split": "train", "captions": ["A man in a red coat.", "He wears a red coat."],
         "file_path": "CUHK01/0001001.png", "processed_tokens": [["a", "man"], ["he"]], "id": 1},
        {"split": "val", "captions": ["A woman in blue jeans."],
         "file_path": "CUHK01/0002001.png", "processed_tokens": [["a"]], "id": 2},
        {"split": "test", "captions": ["A boy with a black backpack.",
                                       "The boy carries a black bag."],
         "file_path": "test_query/p100_s1.jpg", "processed_tokens": [["a"], ["the"]], "id": 3},
        {"split": "test", "captions": ["A girl in a white skirt."],
         "file_path": "test_query/p101_s1.jpg", "processed_tokens": [["a"]], "id": 4},
        {"split": "test", "captions": ["The girl wears a white skirt and sandals."],
         "file_path": "test_query/p101_s2.jpg", "processed_tokens": [["the"]], "id": 4},
    ]
    for i, r in enumerate(records):
        _image(data / "imgs" / r["file_path"], (40 * i, 10, 200))
    (data / "reid_raw.json").write_text(json.dumps(records))
    return data


def icfg_sample(root: Path) -> Path:
    """ICFG-PEDES/ICFG-PEDES.json + imgs/: train and test only."""
    data = root / "ICFG-PEDES"
    records = [
        {"split": "train", "captions": ["A man in a grey suit."],
         "file_path": "train/0001/0001_001.jpg", "id": 0},
        {"split": "test", "captions": ["A woman with a pink umbrella."],
         "file_path": "test/0100/0100_001.jpg", "id": 100},
        {"split": "test", "captions": ["A woman holding a pink umbrella, black shoes."],
         "file_path": "test/0100/0100_002.jpg", "id": 100},
    ]
    for i, r in enumerate(records):
        _image(data / "imgs" / r["file_path"], (10, 60 * i, 30))
    (data / "ICFG-PEDES.json").write_text(json.dumps(records))
    return data


def rstp_sample(root: Path) -> Path:
    """RSTPReid/data_captions.json + imgs/: img_path, two captions per image."""
    data = root / "RSTPReid"
    records = [
        {"id": 0, "img_path": "0000_c14_0031.jpg",
         "captions": ["A man in a black jacket.", "The man wears black trousers."],
         "split": "train"},
        {"id": 3900, "img_path": "3900_c1_0001.jpg",
         "captions": ["A lady in a green dress.", "She carries a brown handbag."],
         "split": "test"},
        {"id": 3901, "img_path": "3901_c7_0002.jpg",
         "captions": ["A tall man with glasses.", "He wears a white shirt."],
         "split": "test"},
        {"id": 3850, "img_path": "3850_c2_0003.jpg",
         "captions": ["A child in yellow.", "The child has a red hat."], "split": "val"},
    ]
    for i, r in enumerate(records):
        _image(data / "imgs" / r["img_path"], (90, 90, 50 * i))
    (data / "data_captions.json").write_text(json.dumps(records))
    return data


SAMPLES = {
    "cuhk-pedes": (cuhk_sample, "reid_raw.json", "file_path"),
    "icfg-pedes": (icfg_sample, "ICFG-PEDES.json", "file_path"),
    "rstpreid": (rstp_sample, "data_captions.json", "img_path"),
}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_loader_accepts_the_documented_layout(fmt, tmp_path):
    make, name, path_field = SAMPLES[fmt]
    data = make(tmp_path)
    records = json.loads((data / name).read_text())
    table = load_caption_dataset(data / name, data / "imgs", fmt)
    assert list(table.image_idx) == list(range(len(records)))
    assert list(table.file_path) == [r[path_field] for r in records]
    assert list(table.pid) == [int(r["id"]) for r in records]
    assert [list(c) for c in table.captions] == [r["captions"] for r in records]
    assert list(table.initial_description) == [r["captions"][0] for r in records]
    # No dialogue annotations: the witness looks at the image instead.
    assert set(table.fine_grained_description) == {""}
    assert all(len(q) == 0 for q in table.questions)
    assert all(len(a) == 0 for a in table.answers)
    train = table[table.split == "train"]
    assert sorted(train.class_id) == list(range(train.pid.nunique()))
    assert set(table[table.split != "train"].class_id) == {-1}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_load_annotations_stage_writes_caption_queries(fmt, tmp_path):
    """The load-annotations stage with data.format: the artifact says its queries are the
    captions, and every caption of a test image is one query of that image."""
    make, name, _ = SAMPLES[fmt]
    data = make(tmp_path)
    out = tmp_path / "annotations.parquet"
    annotations_mod.run({"data": {"format": fmt}}, str(data / name), str(data / "imgs"),
                        str(out))
    read_table(out, "annotations")
    assert read_metadata(out)["format"] == fmt
    assert query_source(out) == "captions"
    test = read_annotations(out, split="test")
    queries = split_queries(test, query_source(out))
    want = [(int(r.image_idx), c) for r in test.itertuples() for c in r.captions]
    assert list(zip(queries.image_idx, queries.initial_description, strict=True)) == want
    assert list(queries.query_id) == list(range(len(want)))
    assert list(queries.pid) == [int(test.set_index("image_idx").pid[i]) for i, _ in want]
    # An image with two captions gives two queries about the same target.
    per_image = queries.groupby("image_idx").size()
    assert (per_image.to_numpy() == test.captions.map(len).to_numpy()).all()


def test_interactive_pedes_queries_stay_one_per_image(tmp_path):
    rows = read_annotations_like([("I saw a man.", ["A man."], 5), ("I saw a woman.", [], 9)])
    q = split_queries(rows)
    assert list(q.query_id) == [5, 9] and list(q.image_idx) == [5, 9]
    assert list(q.initial_description) == ["I saw a man.", "I saw a woman."]


def read_annotations_like(items):
    import pandas as pd

    return pd.DataFrame({
        "image_idx": [i for _, _, i in items], "pid": [1, 2],
        "initial_description": [t for t, _, _ in items],
        "fine_grained_description": ["fine"] * len(items),
        "captions": [c for _, c, _ in items]})


def _broken(fmt, tmp_path, edit):
    make, name, _ = SAMPLES[fmt]
    data = make(tmp_path)
    records = json.loads((data / name).read_text())
    edit(records, data)
    (data / name).write_text(json.dumps(records))
    return data / name, data / "imgs"


BROKEN = [
    ("cuhk-pedes", lambda r, d: r[2].pop("captions"), r"record 2 \(id 3\), field 'captions': missing"),
    ("cuhk-pedes", lambda r, d: r[3].update(captions=["ok", ""]),
     r"record 3 \(id 4\), field 'captions'\[1\]: expected a non-empty string"),
    ("cuhk-pedes", lambda r, d: r[1].update(id="two"), r"record 1 .*field 'id': expected an integer"),
    ("icfg-pedes", lambda r, d: r[1].update(split="query"),
     r"record 1 \(id 100\), field 'split': unknown split 'query'"),
    ("icfg-pedes", lambda r, d: r[2].update(file_path=r[1]["file_path"]),
     r"record 2 \(id 100\), field 'file_path': duplicate of record 1"),
    ("icfg-pedes", lambda r, d: [x.update(split="train") for x in r],
     r"split 'test' has no records"),
    ("rstpreid", lambda r, d: r[1].update(captions=[]),
     r"record 1 \(id 3900\), field 'captions': expected a non-empty list"),
    ("rstpreid", lambda r, d: r[2].pop("img_path"), r"record 2 \(id 3901\), field 'img_path': missing"),
    ("rstpreid", lambda r, d: r[2].update(id=0),
     r"record 2 \(id 0\), field 'split': identity 0 appears in both 'train' and 'test'"),
    ("rstpreid", lambda r, d: (d / "imgs" / r[1]["img_path"]).unlink(),
     r"record 1 \(id 3900\), field 'img_path': image file not found"),
    ("cuhk-pedes", lambda r, d: (d / "imgs" / r[4]["file_path"]).write_bytes(b"not a jpeg"),
     r"record 4 \(id 4\), field 'file_path': image file unreadable"),
]


@pytest.mark.parametrize(("fmt", "edit", "message"), BROKEN)
def test_loader_rejects_broken_records(fmt, edit, message, tmp_path):
    path, images = _broken(fmt, tmp_path, edit)
    with pytest.raises(AnnotationError, match=message) as info:
        load_caption_dataset(path, images, fmt)
    assert str(path) in str(info.value)


def test_loader_rejects_bad_files_and_writes_nothing(tmp_path):
    data = rstp_sample(tmp_path)
    (data / "data_captions.json").write_text("{not json")
    out = tmp_path / "annotations.parquet"
    with pytest.raises(AnnotationError, match="data_captions.json: not valid JSON"):
        annotations_mod.run({"data": {"format": "rstpreid"}}, str(data / "data_captions.json"),
                            str(data / "imgs"), str(out))
    assert not out.exists() and not list(tmp_path.glob(".annotations.parquet*"))
    (data / "data_captions.json").write_text(json.dumps({"id": 1}))
    with pytest.raises(AnnotationError, match="expected a list of records, got dict"):
        load_caption_dataset(data / "data_captions.json", data / "imgs", "rstpreid")
    with pytest.raises(AnnotationError, match="annotation file not found"):
        load_caption_dataset(tmp_path / "missing.json", data / "imgs", "cuhk-pedes")
    with pytest.raises(ValueError, match="unknown caption dataset format 'pedes'"):
        load_caption_dataset(data / "data_captions.json", data / "imgs", "pedes")
