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
from llava_reid.report import plots, ranked_lists

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3
TOP_K = 10
CFG = {"seed": 7, "device": "cpu", "report": {"queries": 3, "top_k": TOP_K}}

# method -> (label, R1 per round, BRI)
METHODS = {
    "initial": ("Initial query only", [20.0, 20.0, 20.0, 20.0], 2.5),
    "random": ("Random questions", [20.0, 24.5, 27.25, 30.0], 2.125),
    "questioner": ("LLaVA-ReID questioner", [20.0, 31.0, 40.125, 47.0], 1.75),
}


def _metrics_json(name: str, label: str, r1: list[float], bri: float) -> dict:
    per_round = [
        {"round": r, "R1": v, "R5": v + 20.0, "R10": v + 30.0, "mAP": v + 5.0,
         "mINP": v / 3.0}
        for r, v in enumerate(r1)
    ]
    return {"method": name, "label": label, "queries": 8, "rounds": ROUNDS,
            "per_round": per_round, "BRI": bri, "seconds": 12.5}


@pytest.fixture
def metrics_files(tmp_path) -> list[str]:
    paths = []
    for name, (label, r1, bri) in METHODS.items():
        path = tmp_path / "eval" / name / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_metrics_json(name, label, r1, bri)))
        paths.append(str(path))
    return paths


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
    cols = {k: [] for k in ("query_id", "pid", "round", "query", "target_rank", "top_k",
                            "candidates", "seen_images", "question", "answer", "query_feat")}
    for qid, (pid, ranks) in DIALOGUES.items():
        query = f"A person number {pid} wearing a dark jacket and walking along the street."
        for r, rank in enumerate(ranks):
            last = r == ROUNDS
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
    write_table(cols, path, "dialogues", config_hash="test", producer="test")
    return path


@pytest.fixture
def dialogue_inputs(tmp_path) -> dict:
    gallery = _make_gallery(tmp_path)
    dialogues = _make_dialogues(tmp_path / "eval" / "questioner" / "dialogues.parquet")
    return {"root": tmp_path, "gallery": gallery, "dialogues": dialogues}


# ---------------------------------------------------------------------------------------------
# plots


def test_plots_write_figures_and_tables(tmp_path, metrics_files):
    out = tmp_path / "report"
    plots.run(CFG, metrics_files, str(out))
    names = ["recall_vs_round.png", "bri.png", "metrics.tsv", "metrics.html"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    with Image.open(out / "recall_vs_round.png") as img:
        w, h = plots.RECALL_FIGSIZE
        assert img.size == (round(w * plots.DPI), round(h * plots.DPI))
    with Image.open(out / "bri.png") as img:
        assert 500 <= img.size[0] <= 2000 and img.size[1] == round(4.2 * plots.DPI)

    # TSV: one row per method x round, values exactly as read.
    with open(out / "metrics.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == len(METHODS) * (ROUNDS + 1)
    for path in metrics_files:
        data = json.loads(Path(path).read_text())
        mine = [r for r in rows if r["method"] == data["method"]]
        assert [int(r["round"]) for r in mine] == list(range(ROUNDS + 1))
        for r, entry in zip(mine, data["per_round"], strict=True):
            assert r["label"] == data["label"]
            for key in plots.METRICS:
                assert float(r[key]) == entry[key]
            assert float(r["BRI"]) == data["BRI"]
            assert int(r["queries"]) == data["queries"]

    # HTML: a row per method; best R@1 after the last round and best (lowest) BRI bold.
    page = (out / "metrics.html").read_text()
    for label, _, _ in METHODS.values():
        assert f'<td class="method">{label}</td>' in page
    assert "R@1 initial" in page and f"R@1 after round {ROUNDS}" in page
    assert "<td><b>47.0</b></td>" in page and "<td>30.0</td>" in page
    assert "<td><b>1.750</b></td>" in page and "<td>2.500</td>" in page
    assert "<td><b>20.0</b></td>" in page  # the initial R@1 ties: all bold


def test_plots_are_deterministic(tmp_path, metrics_files):
    a, b = tmp_path / "a", tmp_path / "b"
    plots.run(CFG, metrics_files, str(a))
    plots.run(CFG, metrics_files, str(b))
    for name in ("recall_vs_round.png", "bri.png", "metrics.tsv", "metrics.html"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_plots_reject_bad_metrics(tmp_path, metrics_files):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "x", "per_round": [{"round": 0, "R1": 1.0}]}))
    with pytest.raises(plots.MetricsError, match="lacks"):
        plots.run(CFG, [bad], str(tmp_path / "out"))
    with pytest.raises(plots.MetricsError, match="twice"):
        plots.run(CFG, [metrics_files[0], metrics_files[0]], str(tmp_path / "out"))


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
    out = tmp_path / "report" / "ranked_lists" / "questioner.png"
    ranked_lists.run(CFG, str(d["dialogues"]), str(d["gallery"]), str(d["root"]), str(out))
    with Image.open(out) as img:
        w, h = img.size
        assert w == ranked_lists.WIDTH
        # 3 dialogues x 4 rounds of rows at least a thumbnail high each.
        assert 3 * (ROUNDS + 1) * 200 < h < 12000
    again = tmp_path / "again.png"
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
        # The target's image sits at its rank, and only identity images are framed green.
        assert t.is_target == (t.image_idx // 2 == pid)
        assert t.is_target == (t.position == rank - 1)
        x0, y0, x1, y1 = t.box
        corners = [px[x0 + 1, y0 + 1], px[x1 - 1, y1 - 1], px[(x0 + x1) // 2, y0 + 1]]
        if t.is_target:
            assert all(c == ranked_lists.GREEN for c in corners), (t, corners)
        else:
            assert all(c != ranked_lists.GREEN for c in corners), (t, corners)
    assert any(t.is_target for t in thumbs)


def test_ranked_lists_survive_missing_images(tmp_path, dialogue_inputs):
    d = dialogue_inputs
    shutil.rmtree(d["root"] / "images")
    out = tmp_path / "missing.png"
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
def test_snakemake_report_includes_the_results(tmp_path, metrics_files, dialogue_inputs):
    """rules/report.smk (and through it both CLI stages) in a tiny workflow whose evaluation
    outputs are copied in; then `snakemake --report` packs every flagged result."""
    work = tmp_path / "wf"
    (work / "rules").mkdir(parents=True)
    for rel in ("rules/common.smk", "rules/report.smk", "envs/train.yaml"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, work / rel)
    shutil.copytree(REPO / "workflow" / "report", work / "workflow" / "report")
    fake = tmp_path / "eval"  # the fixtures' metrics.json and dialogues.parquet live here
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
                "cp {fake}/questioner/dialogues.parquet {{output.dialogues}}"


        rule fake_gallery:
            output:
                out("features/test_gallery.parquet"),
            shell:
                "cp {dialogue_inputs['gallery']} {{output}}"
        """))
    env_run = dict(capture_output=True, text=True, cwd=work)
    proc = subprocess.run(["snakemake", "--cores", "3"], **env_run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (work / "results/t/report/ranked_lists/questioner.png").exists()
    proc = subprocess.run(["snakemake", "--report", "report.zip"], **env_run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import zipfile

    with zipfile.ZipFile(work / "report.zip") as z:
        names = z.namelist()
    for name in ("recall_vs_round.png", "bri.png", "metrics.tsv", "metrics.html",
                 "questioner.png", "initial.png"):
        assert any(n.endswith(name) for n in names), (name, names[:20])
