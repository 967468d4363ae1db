"""Report stage: plots and tables from metrics.json, ranked-list pictures from dialogues."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_reid.artifacts import write_table
from llava_reid.report import bootstrap, plots, ranked_lists, training_curves

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3
TOP_K = 10
CFG = {"seed": 7, "device": "cpu", "report": {"queries": 3, "top_k": TOP_K}}

# method -> (label, queries whose target is at rank 1 after each round, BRI). Query q's rank is
# 1 when q < hits, else 2 + q % 9 (so R@5 and R@10 differ from R@1 too).
N_QUERIES = 20
METHODS = {
    "initial": ("Initial query only", [4, 4, 4, 4], 2.5),
    "random": ("Random questions", [4, 5, 6, 6], 2.125),
    "questioner": ("LLaVA-ReID questioner", [4, 7, 9, 11], 1.75),
}


def _method_ranks(hits: list[int]) -> np.ndarray:
    """Target ranks [round, query]."""
    q = np.arange(N_QUERIES)
    return np.stack([np.where(q < h, 1, 2 + q % 9) for h in hits])


def _write_dialogues(path: Path, ranks_by_query: dict[int, tuple[int, list[int]]],
                     method: str) -> Path:
    """A dialogues.parquet: query_id -> (pid, target rank per round)."""
    cols = {k: [] for k in ("query_id", "pid", "round", "query", "target_rank", "top_k",
                            "candidates", "seen_images", "question", "answer", "query_feat")}
    for qid, (pid, ranks) in ranks_by_query.items():
        query = f"A person number {pid} wearing a dark jacket and walking along the street."
        last_round = len(ranks) - 1
        for r, rank in enumerate(ranks):
            last = r == last_round
            top = _ranking(pid, rank)
            cols["query_id"].append(qid)
            cols["pid"].append(pid)
            cols["round"].append(r)
            cols["query"].append(query)
            cols["target_rank"].append(rank)
            cols["top_k"].append(top)
            cols["candidates"].append([] if last else top[:3])
            cols["seen_images"].append([] if last else top[:3])
            question = "" if last else f"Is the person carrying a bag? (round {r + 1})"
            answer = "" if last else "Yes, a black backpack over the right shoulder. " * 2
            cols["question"].append(question)
            cols["answer"].append(answer)
            cols["query_feat"].append([0.0, 1.0, 0.0])
            query = f"{query} {answer}".strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(cols, path, "dialogues", config_hash="test", producer="test",
                extra_metadata={"method": method})
    return path


def _metrics_json(name: str, label: str, ranks: np.ndarray, bri: float) -> dict:
    per_round = []
    for r, rr in enumerate(ranks):
        recall = {f"R{k}": float(100 * np.mean(rr <= k)) for k in (1, 5, 10)}
        per_round.append({"round": r, **recall, "mAP": recall["R1"] + 5.0,
                          "mINP": recall["R1"] / 3.0})
    return {"method": name, "label": label, "queries": N_QUERIES, "rounds": ROUNDS,
            "per_round": per_round, "BRI": bri, "seconds": 12.5}


@pytest.fixture
def method_files(tmp_path) -> dict[str, list[str]]:
    """Every method's eval/{method}/metrics.json and dialogues.parquet, consistent."""
    metrics, dialogues = [], []
    for name, (label, hits, bri) in METHODS.items():
        ranks = _method_ranks(hits)
        path = tmp_path / "eval" / name / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_metrics_json(name, label, ranks, bri)))
        metrics.append(str(path))
        by_query = {100 + q: (q % N_PIDS, ranks[:, q].tolist()) for q in range(N_QUERIES)}
        dialogues.append(str(_write_dialogues(path.parent / "dialogues.parquet", by_query,
                                              name)))
    return {"metrics": metrics, "dialogues": dialogues}


# Gallery: 12 identities x 2 images (image_idx = 2 * pid + k), small solid-ish PNGs.
N_PIDS = 12


def _make_gallery(root: Path) -> Path:
    rng = np.random.default_rng(0)
    image_idx, pids, files = [], [], []
    for pid in range(N_PIDS):
        for k in range(2):
            idx = 2 * pid + k
            base = rng.integers(40, 200, size=3)
            arr = np.clip(base + rng.integers(-30, 30, size=(192, 64, 3)), 0, 255)
            rel = f"images/p{pid:02d}_{k}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(root / rel)
            image_idx.append(idx)
            pids.append(pid)
            files.append(rel)
    path = root / "features" / "test_gallery.parquet"
    feats = rng.normal(size=(len(image_idx), 4)).astype(np.float32).tolist()
    write_table({"image_idx": image_idx, "pid": pids, "file_path": files, "feat": feats},
                path, "gallery_features", config_hash="test", producer="test")
    return path


def _ranking(target_pid: int, rank: int) -> list[int]:
    """A top-10 where the target identity first appears at ``rank`` (when rank <= 10)."""
    others = [2 * p + k for p in range(N_PIDS) if p != target_pid for k in range(2)]
    top = others[:TOP_K]
    if rank <= TOP_K:
        top.insert(rank - 1, 2 * target_pid)
        top = top[:TOP_K]
    return top


# query_id -> (pid, target rank per round 0..ROUNDS); three did not improve.
DIALOGUES = {
    100: (0, [7, 3, 1, 1]),
    101: (1, [15, 12, 4, 2]),
    102: (2, [5, 5, 5, 5]),
    103: (3, [2, 4, 6, 9]),
    104: (4, [9, 2, 2, 1]),
    105: (5, [30, 20, 11, 8]),
    106: (6, [1, 1, 1, 1]),
    107: (7, [4, 3, 2, 3]),
}


def _make_dialogues(path: Path) -> Path:
    return _write_dialogues(path, DIALOGUES, "questioner")


@pytest.fixture
def dialogue_inputs(tmp_path) -> dict:
    gallery = _make_gallery(tmp_path)
    dialogues = _make_dialogues(tmp_path / "ranked" / "questioner" / "dialogues.parquet")
    return {"root": tmp_path, "gallery": gallery, "dialogues": dialogues}


# ---------------------------------------------------------------------------------------------
# plots


def _plots(files: dict, out: Path, cfg: dict = CFG) -> None:
    plots.run(cfg, files["metrics"], files["dialogues"], str(out))


def test_plots_write_figures_and_tables(tmp_path, method_files):
    out = tmp_path / "report"
    _plots(method_files, out)
    names = ["recall_vs_round.png", "bri.png", "metrics.tsv", "metrics.html"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    with Image.open(out / "recall_vs_round.png") as img:
        w, h = plots.RECALL_FIGSIZE
        assert img.size == (round(w * plots.DPI), round(h * plots.DPI))
    with Image.open(out / "bri.png") as img:
        assert 500 <= img.size[0] <= 2000 and img.size[1] == round(4.2 * plots.DPI)

    # TSV: one row per method x round, values exactly as read, then interval bounds around them.
    with open(out / "metrics.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == len(METHODS) * (ROUNDS + 1)
    for path in method_files["metrics"]:
        data = json.loads(Path(path).read_text())
        mine = [r for r in rows if r["method"] == data["method"]]
        assert [int(r["round"]) for r in mine] == list(range(ROUNDS + 1))
        for r, entry in zip(mine, data["per_round"], strict=True):
            assert r["label"] == data["label"]
            for key in plots.METRICS:
                assert float(r[key]) == entry[key]
            assert float(r["BRI"]) == data["BRI"]
            assert int(r["queries"]) == data["queries"]
            for key in plots.CI_KEYS:
                lo, hi = float(r[f"{key}_low"]), float(r[f"{key}_high"])
                assert 0.0 <= lo <= entry[key] <= hi <= 100.0
                # 20 queries: an interval a few queries wide, unless every query agrees.
                assert (hi - lo >= 10.0) or entry[key] in (0.0, 100.0), (key, lo, hi)

    # HTML: a row per method; best R@1 after the last round and best (lowest) BRI bold;
    # R@1 cells carry their interval; a paired difference per pair of methods.
    page = (out / "metrics.html").read_text()
    for label, _, _ in METHODS.values():
        assert f'<td class="method">{label}</td>' in page
    assert "R@1 initial" in page and f"R@1 after round {ROUNDS}" in page
    assert "<td><b>55.0</b><br><span class=\"ci\">" in page  # questioner: 11 of 20
    assert "<td>30.0<br><span class=\"ci\">" in page  # random: 6 of 20
    assert "<td><b>1.750</b></td>" in page and "<td>2.500</td>" in page
    assert page.count("<td><b>20.0</b><br>") == len(METHODS)  # the initial R@1 ties: all bold
    assert page.count('<span class="ci">') == len(METHODS) * (ROUNDS + 1)
    assert "paired bootstrap interval" in page
    assert page.count("<tr><td class=\"method\">") == len(METHODS) + 3  # + 3 pairs
    # questioner - initial: +35 points on 20 queries, the interval clear of 0 (bold).
    assert ('<td class="method">LLaVA-ReID questioner</td><td class="method">Initial query '
            "only</td><td><b>+35.0</b></td>") in page


def test_plots_are_deterministic(tmp_path, method_files):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _plots(method_files, a)
    _plots(method_files, b)
    for name in ("recall_vs_round.png", "bri.png", "metrics.tsv", "metrics.html"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # Another seed, other resamples: the intervals move, the metrics do not.
    _plots(method_files, c, {**CFG, "seed": CFG["seed"] + 1})
    assert (a / "metrics.tsv").read_text() != (c / "metrics.tsv").read_text()


def test_plots_reject_bad_metrics(tmp_path, method_files):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "x", "per_round": [{"round": 0, "R1": 1.0}]}))
    dialogues = method_files["dialogues"]
    with pytest.raises(plots.MetricsError, match="lacks"):
        plots.run(CFG, [bad], dialogues[:1], str(tmp_path / "out"))
    metrics = method_files["metrics"]
    with pytest.raises(plots.MetricsError, match="twice"):
        plots.run(CFG, [metrics[0], metrics[0]], dialogues[:2], str(tmp_path / "out"))
    # Dialogues out of order, or of other queries.
    with pytest.raises(plots.MetricsError, match="dialogues of method 'random'"):
        plots.run(CFG, metrics[:2], dialogues[1::-1], str(tmp_path / "out"))
    with pytest.raises(plots.MetricsError, match="2 dialogue files for 3"):
        plots.run(CFG, metrics, dialogues[:2], str(tmp_path / "out"))
    other = _write_dialogues(tmp_path / "other.parquet", DIALOGUES, "random")
    with pytest.raises(plots.MetricsError, match="other test queries"):
        plots.run(CFG, metrics[:2], [dialogues[0], str(other)], str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_interval_matches_the_binomial_one():
    rng = np.random.default_rng(0)
    n, p = 400, 0.3
    ranks = bootstrap.Ranks(np.arange(n), np.where(rng.random((1, n)) < p, 1, 50))
    idx = bootstrap.resample_indices(n, seed=3)
    assert idx.shape == (bootstrap.RESAMPLES, n)
    assert np.array_equal(idx, bootstrap.resample_indices(n, seed=3))
    (ci,) = bootstrap.recall_intervals(ranks, idx)
    lo, hi = ci["R1"]
    hat = 100 * float((ranks.ranks[0] == 1).mean())
    half = 196 * np.sqrt(hat / 100 * (1 - hat / 100) / n)  # normal approximation, points
    assert lo < hat < hi
    assert abs((hi - lo) / 2 - half) < 0.6, (lo, hi, half)
    assert ci["R10"] == ci["R5"] == ci["R1"]  # ranks are 1 or 50


def test_paired_difference_is_tighter_than_separate_intervals():
    """Two methods that differ on 8 of 400 queries: +2 points, clear of 0 when paired, while
    their separate intervals overlap almost entirely."""
    n = 400
    base = np.where(np.arange(n) % 3 == 0, 1, 7)
    better = base.copy()
    better[np.flatnonzero(base != 1)[:8]] = 1
    a = bootstrap.Ranks(np.arange(n), better[None])
    b = bootstrap.Ranks(np.arange(n), base[None])
    idx = bootstrap.resample_indices(n, seed=11)
    diff, lo, hi = bootstrap.difference_interval(a, b, 0, idx)
    assert diff == pytest.approx(2.0)
    assert 0.0 < lo < diff < hi < 4.0
    (ca,), (cb,) = bootstrap.recall_intervals(a, idx), bootstrap.recall_intervals(b, idx)
    assert ca["R1"][0] < cb["R1"][1]  # separate intervals overlap
    with pytest.raises(bootstrap.BootstrapError, match="different test queries"):
        bootstrap.difference_interval(a, bootstrap.Ranks(np.arange(1, n + 1), base[None]), 0,
                                      idx)


def test_bootstrap_rejects_incomplete_dialogues(tmp_path):
    path = _write_dialogues(tmp_path / "d.parquet", {1: (0, [3, 2, 1]), 2: (1, [4, 4])}, "x")
    with pytest.raises(bootstrap.BootstrapError, match="one row per round"):
        bootstrap.load_ranks(str(path))
    ranks = bootstrap.load_ranks(str(_write_dialogues(
        tmp_path / "ok.parquet", {5: (0, [3, 2, 1]), 2: (1, [4, 4, 9])}, "x")))
    assert ranks.query_ids.tolist() == [2, 5]
    assert ranks.ranks.tolist() == [[4, 3], [4, 2], [9, 1]]


# ---------------------------------------------------------------------------------------------
# training curves


def _training_files(root: Path) -> dict[str, str]:
    files = {
        "retriever": {"best_epoch": 2, "select_metric": "f-R1", "history": [
            {"epoch": e, "loss": {"sdm": 30.0 - e, "id": 3.0 - 0.1 * e, "mlm": 6.0 - 0.2 * e},
             "val": {"f-R1": 10.0 * e, "i-R1": 5.0 * e}, "seconds": 1.0} for e in (1, 2, 3)]},
        "questioner": {"heldout_loss": 2.5, "history": [
            {"epoch": 1 + s // 30, "step": 1 + s % 30, "loss": 4.0 - s / 30} for s in range(60)]},
        "warmup": {"history": [
            {"epoch": e, "loss": None if e == 0 else 1.0 / e, "heldout_agreement": 0.2 * e}
            for e in range(3)]},
        "joint": {"history": [
            {"epoch": 1, "step": s + 1, "tau": 1.0 - s / 40, "loss": 3.0 - s / 20}
            for s in range(20)]},
    }
    paths = {}
    for name, data in files.items():
        paths[name] = str(root / f"{name}.json")
        Path(paths[name]).write_text(json.dumps(data))
    return paths


def test_training_curves(tmp_path):
    files = _training_files(tmp_path)
    out = tmp_path / "report" / "training_curves.png"
    training_curves.run(CFG, str(out), retriever=files["retriever"],
                        questioner=files["questioner"], warmup=files["warmup"],
                        joint=files["joint"])
    w, h = training_curves.PANEL_SIZE
    with Image.open(out) as img:
        assert img.size == (round(3 * w * plots.DPI), round(2 * h * plots.DPI))
    again = tmp_path / "again.png"
    training_curves.run(CFG, str(again), retriever=files["retriever"],
                        questioner=files["questioner"], warmup=files["warmup"],
                        joint=files["joint"])
    assert out.read_bytes() == again.read_bytes()
    # Without the selector stages: one row of panels.
    training_curves.run(CFG, str(again), retriever=files["retriever"],
                        questioner=files["questioner"])
    with Image.open(again) as img:
        assert img.size == (round(3 * w * plots.DPI), round(h * plots.DPI))


def test_training_curves_reject_a_bad_history(tmp_path):
    files = _training_files(tmp_path)
    data = json.loads(Path(files["retriever"]).read_text())
    del data["history"][1]["val"]
    Path(files["retriever"]).write_text(json.dumps(data))
    with pytest.raises(plots.MetricsError, match=r"retriever.json: history\[1\] lacks \['val'\]"):
        training_curves.run(CFG, str(tmp_path / "x.png"), retriever=files["retriever"],
                            questioner=files["questioner"])
    (tmp_path / "good").mkdir()
    files = _training_files(tmp_path / "good")
    Path(files["questioner"]).write_text(json.dumps({"history": []}))
    with pytest.raises(plots.MetricsError, match="questioner.json: key 'history' missing"):
        training_curves.run(CFG, str(tmp_path / "x.png"), retriever=files["retriever"],
                            questioner=files["questioner"])
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# ranked lists


def _first_last() -> dict[int, tuple[int, int]]:
    return {q: (ranks[0], ranks[-1]) for q, (_, ranks) in DIALOGUES.items()}


def test_choose_dialogues_prefers_improved_and_keeps_one_that_did_not():
    ranks = _first_last()
    improved = {q for q, (a, b) in ranks.items() if b < a}
    for seed in range(20):
        chosen = ranked_lists.choose_dialogues(ranks, 3, seed)
        assert chosen == ranked_lists.choose_dialogues(ranks, 3, seed)
        assert len(chosen) == len(set(chosen)) == 3
        assert sum(q in improved for q in chosen) == 2
    assert len({tuple(ranked_lists.choose_dialogues(ranks, 3, s)) for s in range(20)}) > 1
    # One dialogue: an improved one. More than exist: all of them.
    assert ranked_lists.choose_dialogues(ranks, 1, 0)[0] in improved
    assert sorted(ranked_lists.choose_dialogues(ranks, 50, 0)) == sorted(ranks)
    # Nothing improved: still draws; everything improved: no non-improved one to add.
    flat = {q: (3, 3) for q in ranks}
    assert len(ranked_lists.choose_dialogues(flat, 2, 0)) == 2
    up = {q: (3, 1) for q in ranks}
    assert len(ranked_lists.choose_dialogues(up, 3, 0)) == 3


def test_ranked_lists_picture(tmp_path, dialogue_inputs):
    d = dialogue_inputs
    out = tmp_path / "report" / "ranked_lists" / "questioner.jpg"
    ranked_lists.run(CFG, str(d["dialogues"]), str(d["gallery"]), str(d["root"]), str(out))
    with Image.open(out) as img:
        assert img.format == "JPEG"
        w, h = img.size
        assert w == ranked_lists.WIDTH
        # 3 dialogues x 4 rounds of rows at least a thumbnail high each.
        assert 3 * (ROUNDS + 1) * 200 < h < 12000
    again = tmp_path / "again.jpg"
    ranked_lists.run(CFG, str(d["dialogues"]), str(d["gallery"]), str(d["root"]), str(again))
    assert out.read_bytes() == again.read_bytes()


def test_ranked_lists_outline_the_target(dialogue_inputs):
    d = dialogue_inputs
    by_query = ranked_lists._load_dialogues(str(d["dialogues"]))
    chosen = ranked_lists.choose_dialogues(_first_last(), 3, CFG["seed"])
    gallery = ranked_lists._Gallery(str(d["gallery"]), str(d["root"]), (64, 192))
    picture, thumbs = ranked_lists.render(by_query, chosen, gallery, TOP_K, "test")
    assert not gallery.missing
    assert len(thumbs) == 3 * (ROUNDS + 1) * TOP_K
    px = picture.load()
    for t in thumbs:
        pid, ranks = DIALOGUES[t.query_id]
        rank = ranks[t.round]
        # The target's image sits at its rank; identity images are framed green, others red.
        assert t.is_target == (t.image_idx // 2 == pid)
        assert t.is_target == (t.position == rank - 1)
        x0, y0, x1, y1 = t.box
        corners = [px[x0 + 1, y0 + 1], px[x1 - 1, y1 - 1], px[(x0 + x1) // 2, y0 + 1]]
        if t.is_target:
            assert all(c == ranked_lists.GREEN for c in corners), (t, corners)
        else:
            assert all(c == ranked_lists.RED for c in corners), (t, corners)
    assert any(t.is_target for t in thumbs)


def test_ranked_lists_survive_missing_images(tmp_path, dialogue_inputs):
    d = dialogue_inputs
    shutil.rmtree(d["root"] / "images")
    out = tmp_path / "missing.jpg"
    ranked_lists.run(CFG, str(d["dialogues"]), str(d["gallery"]), str(d["root"]), str(out))
    assert out.exists()


# ---------------------------------------------------------------------------------------------
# CLI and Snakemake report (need the `report` section in the config schema)


def _schema_has_report() -> bool:
    from llava_reid.config import load_schema

    return "report" in load_schema().get("properties", {})


needs_schema = pytest.mark.skipif(
    not _schema_has_report(), reason="workflow schema has no `report` section yet"
)


@needs_schema
@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")
def test_snakemake_report_includes_the_results(tmp_path, method_files, dialogue_inputs):
    """rules/report.smk (and through it every report CLI stage) in a tiny workflow whose
    evaluation and training outputs are copied in; then `snakemake --report` packs every
    flagged result, with no docutils error and no R@k turned into a mailto link."""
    work = tmp_path / "wf"
    (work / "rules").mkdir(parents=True)
    for rel in ("rules/common.smk", "rules/report.smk", "envs/train.yaml"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, work / rel)
    shutil.copytree(REPO / "workflow" / "report", work / "workflow" / "report")
    fake = tmp_path / "eval"  # the fixtures' metrics.json and dialogues.parquet live here
    (tmp_path / "training").mkdir()
    training = _training_files(tmp_path / "training")
    config = {"run": "t", "results": "results", "seed": 7, "device": "cpu",
              "data": {"source": "annotations", "image_root": str(dialogue_inputs["root"])},
              "dialogue": {"rounds": ROUNDS}, "report": CFG["report"],
              "evaluate": {"methods": ["initial", "questioner"]}}
    (work / "config.yaml").write_text(json.dumps(config))
    (work / "Snakefile").write_text(textwrap.dedent(f"""\
        configfile: "config.yaml"


        report: "workflow/report/workflow.rst"


        include: "rules/common.smk"
        include: "rules/report.smk"


        rule all:
            input:
                report_targets(),


        rule fake_eval:
            output:
                metrics=out("eval/{{method}}/metrics.json"),
                dialogues=out("eval/{{method}}/dialogues.parquet"),
            shell:
                "cp {fake}/{{wildcards.method}}/metrics.json {{output.metrics}} && "
                "cp {fake}/{{wildcards.method}}/dialogues.parquet {{output.dialogues}}"


        rule fake_training:
            output:
                retriever=out("retriever/metrics.json"),
                questioner=out("questioner/metrics.json"),
            shell:
                "cp {training['retriever']} {{output.retriever}} && "
                "cp {training['questioner']} {{output.questioner}}"


        rule fake_gallery:
            output:
                out("features/test_gallery.parquet"),
            shell:
                "cp {dialogue_inputs['gallery']} {{output}}"
        """))
    env_run = dict(capture_output=True, text=True, cwd=work)
    proc = subprocess.run(["snakemake", "--cores", "3"], **env_run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (work / "results/t/report/ranked_lists/questioner.jpg").exists()
    assert (work / "results/t/report/training_curves.png").exists()
    proc = subprocess.run(["snakemake", "--report", "report.zip"], **env_run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import zipfile

    with zipfile.ZipFile(work / "report.zip") as z:
        names = z.namelist()
        text = "".join(z.read(n).decode(errors="replace") for n in names
                       if n.endswith((".html", ".js")))
    for name in ("recall_vs_round.png", "bri.png", "metrics.tsv", "metrics.html",
                 "questioner.jpg", "initial.jpg", "training_curves.png"):
        assert any(n.endswith(name) for n in names), (name, names[:20])
    assert "System Message" not in text and "Unknown target name" not in text
    assert "mailto:" not in text
    assert "R&#64;1" in text or "R@1" in text
