"""Retriever stages end to end on a small synthetic set: init, train (seeded, resumable),
features in Parquet."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from llava_reid.artifacts import read_metadata
from llava_reid.retriever.encoder import RetrieverEncoder
from tests.conftest import REPO, llava_reid


def _train_args(data, init, out):
    return [
        "train-retriever", "--annotations", str(data["annotations"]),
        "--image-root", str(data["root"]), "--init", str(init),
        "--out", str(out / "model"), "--metrics", str(out / "metrics.json"),
        "--checkpoints", str(out / "checkpoints"),
    ]


@pytest.fixture(scope="module")
def trained(small_dataset, tmp_path_factory):
    data, cfg = small_dataset, small_dataset["cfg"]
    work = tmp_path_factory.mktemp("retriever")
    init = work / "init"
    llava_reid("init-retriever", "--annotations", str(data["annotations"]), "--out", str(init),
               cfg=cfg)
    run_a = work / "a"
    llava_reid(*_train_args(data, init, run_a), cfg=cfg)
    return {"data": data, "cfg": cfg, "init": init, "run": run_a, "work": work}


def test_training_writes_model_and_metrics(trained):
    metrics = json.loads((trained["run"] / "metrics.json").read_text())
    assert len(metrics["history"]) == trained["cfg"]["retriever"]["epochs"]
    assert 1 <= metrics["best_epoch"] <= trained["cfg"]["retriever"]["epochs"]
    for split in ("val", "test"):
        for key in ("f-R1", "f-R5", "f-R10", "f-mAP", "f-mINP", "i-R1", "i-mAP"):
            assert 0.0 <= metrics[split][key] <= 100.0
    # The kept epoch is the best validation epoch, by the configured metric.
    history = {h["epoch"]: h["val"]["f-R1"] for h in metrics["history"]}
    assert history[metrics["best_epoch"]] == max(history.values())
    # Training losses are recorded per enabled loss and are finite.
    for h in metrics["history"]:
        assert set(h["loss"]) == {"sdm", "id", "mlm"}
        assert all(np.isfinite(v) for v in h["loss"].values())
    enc = RetrieverEncoder.from_pretrained(trained["run"] / "model", "cpu")
    feats = enc.encode_texts(["i saw a man in a red top", "a woman"])
    assert feats.shape == (2, 32)
    assert np.allclose(feats.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_validation_on_preloaded_images_equals_encoding_the_files(trained):
    """The per-epoch validation decodes the split's images once; its metrics must be the
    ones computed from the image files through the encoder's own loading path."""
    from llava_reid.data.annotations import read_annotations
    from llava_reid.metrics import rank_metrics
    from llava_reid.retriever.train import SplitEvaluation

    data = trained["data"]
    rows = read_annotations(str(data["annotations"]), split="val")
    enc = RetrieverEncoder.from_pretrained(trained["run"] / "model", "cpu")
    got = SplitEvaluation(rows, data["root"], enc.transform)(enc, bs=5)
    gallery = enc.encode_images([data["root"] / p for p in rows.file_path])
    pids = torch.tensor(rows.pid.to_numpy())
    fine = rank_metrics(enc.encode_texts(list(rows.fine_grained_description)) @ gallery.t(),
                        pids, pids)
    assert got["f-R1"] == pytest.approx(float(fine["R1"]), abs=1e-3)
    assert got["f-mAP"] == pytest.approx(float(fine["mAP"]), abs=1e-3)
    assert set(got) >= {"f-R1", "f-R5", "f-R10", "i-R1", "i-mAP", "i-mINP"}
    metrics = json.loads((trained["run"] / "metrics.json").read_text())
    assert metrics["val"] == pytest.approx(got, abs=1e-2)


def test_same_config_same_metrics(trained):
    run_b = trained["work"] / "b"
    llava_reid(*_train_args(trained["data"], trained["init"], run_b), cfg=trained["cfg"])
    a = json.loads((trained["run"] / "metrics.json").read_text())
    b = json.loads((run_b / "metrics.json").read_text())
    for h in a["history"] + b["history"]:
        h.pop("seconds")
    assert a == b


def test_killed_training_resumes_from_last_checkpoint(trained):
    run_c = trained["work"] / "c"
    args = _train_args(trained["data"], trained["init"], run_c)
    cmd = [sys.executable, "-m", "llava_reid.cli", args[0], "--config",
           json.dumps(trained["cfg"]), *args[1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_c / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (run_c / "metrics.json").exists(), "the run finished before it could be killed"
    assert not (run_c / "model").exists()
    killed_at = json.loads(state.read_text())["epoch"]
    done = llava_reid(*args, cfg=trained["cfg"])
    assert f"resuming after epoch {killed_at}" in done.stderr
    a = json.loads((trained["run"] / "metrics.json").read_text())
    c = json.loads((run_c / "metrics.json").read_text())
    for h in a["history"] + c["history"]:
        h.pop("seconds")
    assert a == c


def test_changed_config_does_not_resume(trained, tmp_path):
    """An interrupted stage rerun with another config starts over."""
    cfg = json.loads(json.dumps(trained["cfg"]))
    args = _train_args(trained["data"], trained["init"], tmp_path / "d")
    _kill_after_first_epoch(args, cfg, tmp_path / "d" / "checkpoints" / "last" / "state.json")
    cfg["retriever"]["lr"] = 5e-4
    again = llava_reid(*args, cfg=cfg)
    assert "resuming" not in again.stderr
    assert "another config" in again.stderr


def test_rewritten_input_does_not_resume(trained, tmp_path):
    """Snakemake reruns training when an input was rewritten at the same path (a retrained
    upstream model, new data): that run must start over, not resume the old checkpoint."""
    import os
    import shutil

    init = tmp_path / "init"
    shutil.copytree(trained["init"], init)
    cfg = json.loads(json.dumps(trained["cfg"]))
    args = _train_args(trained["data"], init, tmp_path / "e")
    _kill_after_first_epoch(args, cfg, tmp_path / "e" / "checkpoints" / "last" / "state.json")
    config = init / "config.json"
    config.write_text(config.read_text())  # rewritten: same path, new file
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    again = llava_reid(*args, cfg=cfg)
    assert "resuming" not in again.stderr
    assert "other input files" in again.stderr


def _kill_after_first_epoch(args, cfg, state):
    cmd = [sys.executable, "-m", "llava_reid.cli", args[0], "--config", json.dumps(cfg),
           *args[1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert state.exists(), "the run finished (or failed) before it could be killed"


def test_cache_features_parquet(trained, tmp_path):
    data = trained["data"]
    gallery, queries = tmp_path / "test_gallery.parquet", tmp_path / "test_queries.parquet"
    llava_reid("cache-features", "--annotations", str(data["annotations"]),
               "--image-root", str(data["root"]), "--model", str(trained["run"] / "model"),
               "--split", "test", "--gallery-out", str(gallery), "--queries-out", str(queries),
               cfg=trained["cfg"])
    ann = pd.read_parquet(data["annotations"])
    test = ann[ann.split == "test"]
    g = pd.read_parquet(gallery)
    assert list(g.image_idx) == list(test.image_idx)
    assert list(g.pid) == list(test.pid)
    feats = np.stack(g.feat.to_numpy())
    assert feats.shape == (len(test), 32) and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    schema = pq.read_schema(gallery)
    assert str(schema.field("feat").type) == "fixed_size_list<element: float>[32]"
    meta = read_metadata(gallery)
    assert meta["kind"] == "gallery_features" and meta["split"] == "test"
    assert len(meta["config_hash"]) == 16
    q = pq.read_table(queries).to_pandas()
    assert list(q.query_id) == list(test.image_idx)
    # The features are the encoder's: recompute one query and compare.
    enc = RetrieverEncoder.from_pretrained(trained["run"] / "model", "cpu")
    again = enc.encode_texts([test.initial_description.iloc[0]]).numpy()[0]
    assert np.allclose(q.initial_feat.iloc[0], again, atol=1e-5)
    n = duckdb.sql(f"SELECT count(*), min(len(feat)) FROM '{gallery}'").fetchall()[0]
    assert n == (len(test), 32)
