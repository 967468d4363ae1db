"""The real DAG end to end, on the embedded default shrunk to run in minutes on 2 cores.

`snakemake --cores 2` builds every artifact from synthetic data to the report; the test then
checks the artifacts, that the questioner saw exactly its candidates, that 1 and 3 evaluation
chunks give the same merged metrics, that a stage resumes, and `snakemake --report`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import torch
import yaml

from llava_reid.artifacts import read_metadata
from llava_reid.stage_views import METHODS
from tests.conftest import (
    REPO,
    copy_of_trained_run,
    dry_run,
    llava_reid,
    planned_jobs,
    planned_rules,
    snakemake,
    write_config,
)

pytestmark = pytest.mark.workflow

METHODS = list(METHODS)


@pytest.fixture(scope="module")
def workflow(trained_run):
    """The shared small trained run (read-only here)."""
    assert trained_run["cfg"]["evaluate"]["methods"] == METHODS
    assert trained_run["cfg"]["evaluate"]["chunks"] == 2
    return trained_run


def test_every_artifact_is_built(workflow):
    run = workflow["run"]
    for rel in ["data/annotations.parquet", "retriever/metrics.json",
                "features/test_gallery.parquet", "prepare/oracle_plan.parquet",
                "prepare/conversations.parquet", "questioner/visual_tokens/test.safetensors",
                "questioner/adapter/adapter_config.json", "questioner/metrics.json",
                "selector/warmup.safetensors", "joint/selector.safetensors",
                "joint/adapter/adapter_config.json", "report/recall_vs_round.png",
                "report/training_curves.png",
                "report/metrics.tsv", "retriever/folds/1/metrics.json",
                "features/folds/1/train_gallery.parquet"]:
        assert (run / rel).exists(), rel
    for method in METHODS:
        assert (run / f"eval/{method}/dialogues.parquet").exists()
        assert (run / f"report/ranked_lists/{method}.jpg").exists()
    # Every rule leaves a log and a benchmark.
    assert len(list((run / "logs").glob("*.log"))) >= 15
    assert len(list((run / "benchmarks").glob("*.tsv"))) >= 15


def test_metrics_per_round_and_baselines(workflow):
    run, rounds = workflow["run"], workflow["cfg"]["dialogue"]["rounds"]
    metrics = {m: json.loads((run / f"eval/{m}/metrics.json").read_text()) for m in METHODS}
    queries = pd.read_parquet(run / "features/test_queries.parquet")
    for res in metrics.values():
        assert res["queries"] == len(queries) and res["rounds"] == rounds
        assert [p["round"] for p in res["per_round"]] == list(range(rounds + 1))
        for p in res["per_round"]:
            assert 0 <= p["R1"] <= p["R5"] <= p["R10"] <= 100
        assert res["BRI"] >= 0
    # All methods start from the same initial query.
    first = {m: metrics[m]["per_round"][0]["R1"] for m in METHODS}
    assert len(set(first.values())) == 1
    # No questions: nothing changes. The oracle never does worse than the initial query.
    flat = [p["R1"] for p in metrics["initial"]["per_round"]]
    assert len(set(flat)) == 1
    assert metrics["oracle"]["per_round"][-1]["R1"] >= first["oracle"]
    assert metrics["oracle"]["BRI"] <= metrics["initial"]["BRI"]


def test_dialogues_record_what_the_questioner_saw(workflow):
    run, cfg = workflow["run"], workflow["cfg"]
    for method in ("questioner", "selector"):
        df = pd.read_parquet(run / f"eval/{method}/dialogues.parquet")
        asked = df[df["round"] < cfg["dialogue"]["rounds"]]
        assert len(asked) > 0
        for row in asked.itertuples():
            assert list(row.seen_images) == list(row.candidates)
            assert len(row.candidates) == cfg["dialogue"]["num_candidates"]
            assert len(set(row.candidates)) == len(row.candidates)
            # The top-1 of the round's ranking is always the first candidate.
            assert row.candidates[0] == row.top_k[0]
        last = df[df["round"] == cfg["dialogue"]["rounds"]]
        assert (last.question == "").all() and last.candidates.map(len).eq(0).all()
    plain = pd.read_parquet(run / "eval/questioner/dialogues.parquet")
    asked = plain[plain["round"] < cfg["dialogue"]["rounds"]]
    for row in asked.itertuples():  # plain top-k: the candidates are the ranking's head
        assert list(row.candidates) == list(row.top_k[: len(row.candidates)])


def test_labels_come_from_the_retriever_that_never_saw_the_identity(workflow):
    """prepare.cross_fit 2: each training image's look-ahead ranks against its fold's images
    with the fold retriever trained without them; pools still come from the whole gallery."""
    from llava_reid.retriever.encoder import RetrieverEncoder
    from llava_reid.retriever.gallery import Gallery

    run = workflow["run"]
    plan = pd.read_parquet(run / "prepare/oracle_plan.parquet")
    convs = pd.read_parquet(run / "prepare/conversations.parquet")
    annotations = pd.read_parquet(run / "data/annotations.parquet")
    train = annotations[annotations.split == "train"].set_index("image_idx")
    meta = read_metadata(run / "prepare/conversations.parquet")
    assert len(json.loads(meta["label_retrievers"])) == 2
    folds = [Gallery.from_parquet(str(run / f"features/folds/{k}/train_gallery.parquet"))
             for k in range(2)]
    fold_pids = [set(g.pids.tolist()) for g in folds]
    assert not fold_pids[0] & fold_pids[1]
    assert fold_pids[0] | fold_pids[1] == set(train.pid)
    for k, gallery in enumerate(folds):
        first = plan[(plan["round"] == 0) & plan.pid.isin(fold_pids[k])]
        assert len(first) > 0
        encoder = RetrieverEncoder.from_pretrained(str(run / f"retriever/folds/{k}/model"), "cpu")
        feats = encoder.encode_texts(list(train.loc[first.image_idx, "initial_description"]), 64)
        ranks = gallery.target_ranks(feats, torch.tensor(first.pid.to_numpy())).tolist()
        assert ranks == first.rank_before.tolist()
        assert max(ranks) <= len(gallery) < len(train)
    # Pools rank the whole training gallery: an image's pool holds the other fold's people.
    pid_of = train.pid.to_dict()
    fold_of = {pid: k for k, pids in enumerate(fold_pids) for pid in pids}
    mixed = [len({fold_of[pid_of[int(i)]] for i in pool}) == 2 for pool in convs.pool]
    assert all(mixed)


def test_parquet_artifacts_open_everywhere(workflow):
    run = workflow["run"]
    conv = run / "prepare/conversations.parquet"
    n = duckdb.sql(f"SELECT count(*) FROM '{conv}'").fetchall()[0][0]
    assert n == len(pd.read_parquet(conv)) > 0
    meta = read_metadata(run / "eval/questioner/dialogues.parquet")
    assert meta["kind"] == "dialogues" and meta["producer"] == "merge-eval"


def test_chunk_count_does_not_change_results(workflow, tmp_path):
    """Evaluate the selector method as 1 and as 3 chunks: identical merged dialogues."""
    run, cfg = workflow["run"], workflow["cfg"]
    common = ["--annotations", str(run / "data/annotations.parquet"),
              "--gallery", str(run / "features/test_gallery.parquet"),
              "--queries", str(run / "features/test_queries.parquet"),
              "--retriever", str(run / "retriever/model"),
              "--questioner", str(run / "models/questioner_tiny"),
              "--adapter", str(run / "joint/adapter"),
              "--visual-tokens", str(run / "questioner/visual_tokens/test.safetensors"),
              "--selector", str(run / "joint/selector.safetensors")]
    merged = {}
    for n in (1, 3):
        chunks = []
        for i in range(n):
            chunks.append(tmp_path / f"{n}/{i}-of-{n}.parquet")
            llava_reid("evaluate", "--method", "selector", "--chunk", str(i), "--chunks", str(n),
                       *common, "--answers-cache", str(tmp_path / f"{n}/answers{i}.parquet"),
                       "--out", str(chunks[-1]), cfg=cfg)
        llava_reid("merge-eval", "--method", "selector", "--chunks", *map(str, chunks),
                   "--gallery", str(run / "features/test_gallery.parquet"),
                   "--queries", str(run / "features/test_queries.parquet"),
                   "--out", str(tmp_path / f"{n}/dialogues.parquet"),
                   "--metrics", str(tmp_path / f"{n}/metrics.json"), cfg=cfg)
        merged[n] = (json.loads((tmp_path / f"{n}/metrics.json").read_text()),
                     pd.read_parquet(tmp_path / f"{n}/dialogues.parquet"))
    (m1, d1), (m3, d3) = merged[1], merged[3]
    assert m1["per_round"] == m3["per_round"] and m1["BRI"] == m3["BRI"]
    cols = ["query_id", "round", "question", "answer", "target_rank"]
    pd.testing.assert_frame_equal(d1[cols], d3[cols])
    # ... and equal to the DAG's own 2-chunk run.
    dag = pd.read_parquet(run / "eval/selector/dialogues.parquet")
    pd.testing.assert_frame_equal(d1[cols], dag[cols])


def test_snakemake_report(workflow, tmp_path):
    html = tmp_path / "report.html"
    snakemake(workflow["work"], "--report", str(html), configfiles=[workflow["cfg_file"]])
    text = html.read_text(errors="replace")
    assert html.stat().st_size > 10_000 and "recall_vs_round" in text


def test_nothing_left_to_do_and_forcerun_one_stage(workflow):
    dry = dry_run(workflow["work"], workflow["cfg_file"])
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "Nothing to be done" in dry.stdout + dry.stderr


def _planned_jobs(workflow, tmp_path, edit) -> list[tuple[str, str]]:
    """(rule, method wildcard or "") of every job a dry run plans after ``edit(cfg)``."""
    cfg = workflow["cfg"]
    edit(cfg)
    dry = dry_run(workflow["work"], write_config(tmp_path / "edited.yaml", cfg))
    return [(rule, method.group(1) if (method := re.search(r"\bmethod=(\w+)", wildcards)) else "")
            for rule, wildcards in planned_jobs(dry)]


def test_editing_generation_reruns_only_the_questioners_evaluation(workflow, tmp_path):
    jobs = _planned_jobs(workflow, tmp_path,
                         lambda cfg: cfg["evaluate"]["generation"].update(top_p=0.5))
    rules = {r for r, _ in jobs}
    assert "evaluate" in rules
    assert rules <= {"evaluate", "merge_eval", "plots", "ranked_lists", "all"}, rules
    for rule in ("evaluate", "merge_eval", "ranked_lists"):
        assert {m for r, m in jobs if r == rule} == {"questioner", "selector"}, rule


def test_editing_sft_keeps_the_model_caches_and_the_baselines(workflow, tmp_path):
    """A new SFT learning rate retrains the adapter and what follows, but neither rebuilds the
    base model or its visual-token caches nor reruns the question-free baselines."""
    jobs = _planned_jobs(workflow, tmp_path,
                         lambda cfg: cfg["questioner"]["sft"].update(lr=1.0e-3))
    rules = {r for r, _ in jobs}
    assert {"train_questioner", "train_joint", "evaluate"} <= rules
    assert not rules & {"build_tiny_questioner", "cache_visual_tokens", "prepare_data",
                        "warmup_selector", "train_retriever"}, rules
    assert {m for r, m in jobs if r == "evaluate"} == {"questioner", "selector"}


def test_editing_num_candidates_keeps_the_training_data_and_the_baselines(workflow, tmp_path):
    """prepare_data and the question-free baselines do not read num_candidates: editing it
    reruns the questioner's stages and the selector only."""
    jobs = _planned_jobs(workflow, tmp_path,
                         lambda cfg: cfg["dialogue"].update(num_candidates=3))
    rules = {r for r, _ in jobs}
    assert {"train_questioner", "warmup_selector", "train_joint", "evaluate"} <= rules
    assert not rules & {"prepare_data", "train_retriever", "cache_features",
                        "cache_visual_tokens"}, rules
    assert {m for r, m in jobs if r == "evaluate"} == {"questioner", "selector"}


def test_editing_cross_fit_retrains_the_fold_retrievers_not_the_retriever(workflow, tmp_path):
    """More folds: every fold retriever retrains (each leaves out other identities), then the
    labels and what learns from them; the retriever and its features stay."""
    assert workflow["cfg"]["prepare"]["cross_fit"] == 2
    jobs = _planned_jobs(workflow, tmp_path, lambda cfg: cfg["prepare"].update(cross_fit=3))
    rules = {r for r, _ in jobs}
    assert [r for r, _ in jobs].count("train_retriever_fold") == 3
    assert [r for r, _ in jobs].count("cache_fold_features") == 3
    assert {"prepare_data", "train_questioner", "warmup_selector", "train_joint"} <= rules
    assert not rules & {"train_retriever", "cache_features", "init_retriever"}, rules
    assert {m for r, m in jobs if r == "evaluate"} == {"questioner", "selector"}


def _interrupt_after_checkpoint(args: list[str], cfg: dict, checkpoints: Path, timeout=600):
    """Start a training stage, kill it once its first resumable checkpoint exists."""
    import json as _json
    import time as _time

    cmd = [sys.executable, "-m", "llava_reid.cli", args[0], "--config", _json.dumps(cfg),
           *args[1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = _time.time() + timeout
    while not (checkpoints / "last" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert _time.time() < deadline, "no checkpoint appeared"
        _time.sleep(0.2)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("stage", ["train-questioner", "train-joint"])
def test_training_resumes_after_interruption(workflow, tmp_path, stage):
    """Killed after its first checkpoint and rerun, a stage ends with the same loss curve as
    an uninterrupted run (every random draw derives from seed, epoch and step)."""
    run, cfg = workflow["run"], workflow["cfg"]
    common = ["--model", str(run / "models/questioner_tiny"),
              "--conversations", str(run / "prepare/conversations.parquet"),
              "--visual-tokens", str(run / "questioner/visual_tokens/train.safetensors"),
              "--annotations", str(run / "data/annotations.parquet"),
              "--image-root", str(run / "data/synthetic")]
    if stage == "train-joint":
        common += ["--adapter", str(run / "questioner/adapter"),
                   "--selector", str(run / "selector/warmup.safetensors"),
                   "--gallery", str(run / "features/train_gallery.parquet"),
                   "--retriever", str(run / "retriever/model")]

    def outputs(folder: Path) -> list[str]:
        if stage == "train-joint":
            return ["--out-adapter", str(folder / "adapter"),
                    "--out-selector", str(folder / "selector.safetensors"),
                    "--metrics", str(folder / "metrics.json"),
                    "--checkpoints", str(folder / "ck")]
        return ["--out", str(folder / "adapter"), "--metrics", str(folder / "metrics.json"),
                "--checkpoints", str(folder / "ck")]

    # The uninterrupted run: the DAG's own job of this stage, on the same inputs and config.
    whole = run / ("joint" if stage == "train-joint" else "questioner")
    resumed = tmp_path / "resumed"
    _interrupt_after_checkpoint([stage, *common, *outputs(resumed)], cfg, resumed / "ck")
    assert not (resumed / "metrics.json").exists()
    proc = llava_reid(stage, *common, *outputs(resumed), cfg=cfg)
    assert "resuming after epoch" in proc.stderr
    a = json.loads((whole / "metrics.json").read_text())["history"]
    b = json.loads((resumed / "metrics.json").read_text())["history"]
    assert [h["step"] for h in a] == [h["step"] for h in b]
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], abs=1e-4)


def test_transfer_run_on_the_embedded_test_split(workflow, tmp_path):
    """workflow/presets/transfer-embedded.yaml on the trained run as the earlier run: its test
    split in RSTPReid's layout (two captions an image), the rendered witness, our retriever's
    own scores fused in. Nothing trains; every caption is a dialogue; the report shows the
    dialogue beside the caption-only query, each with and without the auxiliary scores."""
    from llava_reid.answerer.rendered import question_slot
    from llava_reid.config import load_yaml
    from llava_reid.data import attributes as A
    from llava_reid.data.attributes import Person
    from tests.test_transfer_dag import TRAINING_RULES, _merged

    # Its own copy of the run: the transfer run is built in the same working directory.
    copied = copy_of_trained_run(workflow, tmp_path / "work")
    work, run, cfg = copied["work"], copied["run"], copied["cfg"]
    preset = load_yaml((REPO / "workflow/presets/transfer-embedded.yaml").read_text())
    earlier = f"{cfg['results']}/{cfg['run']}"
    text = yaml.safe_dump(preset).replace("results/embedded/", f"{earlier}/")
    tcfg = _merged(cfg, yaml.safe_load(text))
    tcfg["dialogue"]["rounds"] = 5
    tcfg["evaluate"]["chunks"] = 1
    cfg_file = write_config(work / "transfer-config.yaml", tcfg)
    planned = planned_rules(dry_run(work, cfg_file))
    assert "import_retriever" in planned and not planned & TRAINING_RULES, planned
    snakemake(work, configfiles=[cfg_file])

    out = work / tcfg["results"] / tcfg["run"]
    test_images = pd.read_parquet(run / "features/test_gallery.parquet")
    queries = pd.read_parquet(out / "features/test_queries.parquet")
    assert len(queries) == 2 * len(test_images)  # two captions an image, each one query
    assert queries.groupby("image_idx").size().eq(2).all()
    drawn = json.loads((run / "data/synthetic/images/drawn.json").read_text())
    paths = pd.read_parquet(out / "data/annotations.parquet").set_index("image_idx").file_path
    target = queries.set_index("query_id").image_idx
    dialogues = pd.read_parquet(out / "eval/questioner/dialogues.parquet")
    asked = dialogues[dialogues["round"] < 5]
    answered = 0
    for row in asked.itertuples():  # the witness states what was drawn in the target image
        slot = question_slot(row.question) if len(row.question.strip()) >= 15 else None
        if slot is None:
            assert row.answer == "I don't know."
        else:
            person = Person(**drawn[paths[target[row.query_id]]])
            assert row.answer == A.statement(person, slot)
            answered += 1
    assert answered > 0

    metrics = {m: json.loads((out / f"eval/{m}/metrics.json").read_text())
               for m in ("initial", "questioner")}
    for m in metrics.values():
        assert m["queries"] == len(queries) and m["rounds"] == 5
        assert m["with_auxiliary"]["weight"] == 0.5
        # The auxiliary scores are the caption's own: round 0 ranks exactly as without them.
        assert m["with_auxiliary"]["per_round"][0] == m["per_round"][0]
    assert metrics["questioner"]["per_round"][0] == metrics["initial"]["per_round"][0]
    table = pd.read_csv(out / "report/metrics.tsv", sep="\t")
    assert set(table.method) == {"initial", "initial+auxiliary", "questioner",
                                 "questioner+auxiliary"}
    first = metrics["initial"]["per_round"][0]["R1"]
    last = metrics["questioner"]["per_round"][-1]["R1"]
    print(f"\ntransfer (small run): caption-only R@1 {first}, after 5 rounds {last}; "
          f"with auxiliary {metrics['questioner']['with_auxiliary']['per_round'][-1]['R1']}")
