"""The witness demo on a tiny trained run: `snakemake demo`, the page in a real headless
browser (Debian's chromium through Selenium and /usr/bin/chromedriver; nothing downloaded),
and `llava-reid chat` through its standard input.

The expected rankings, candidates and questions are computed here through the dialogue engine
(rank, then the asker's round), independently of the witness session code the page uses.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llava_reid.artifacts import read_metadata, read_table
from llava_reid.dialogue.askers import Dialogue, RoundContext
from llava_reid.dialogue.engine import advance
from llava_reid.dialogue.merge import round_metrics
from llava_reid.retriever.gallery import Gallery
from tests.conftest import (
    REPO,
    copy_of_trained_run,
    dry_run,
    planned_jobs,
    small_config,
    snakemake,
    write_config,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOP_K = 10
DESCRIPTION = "I remember a woman who wore a t-shirt and black trousers."
ANSWERS = ["Her t-shirt was green and she carried a red backpack.", "Her hair was long."]
TOKEN = "s3cret-demo-token"


@pytest.fixture(scope="module")
def tiny_run(trained_run, tmp_path_factory):
    """`snakemake demo` on a copy of the session's small trained run (the selector method): the
    demo saves the config it ran on into the run folder."""
    run_info = copy_of_trained_run(trained_run, tmp_path_factory.mktemp("demo_run") / "work")
    proc = snakemake(run_info["work"], "demo", configfiles=[run_info["cfg_file"]])
    return {**run_info, "printed": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def engine(tiny_run):
    """The run's dialogue engine, loaded as evaluation loads it."""
    from llava_reid.witness.models import WitnessModels
    from llava_reid.witness.run_files import RunFiles

    cfg = tiny_run["cfg"]
    return WitnessModels.load(cfg, RunFiles.locate(tiny_run["run"], cfg)).engine


def expected_round(engine, dialogue: Dialogue, round_: int) -> dict:
    """One round through the engine: the ranking, and the asker's question and candidates."""
    feats, ranks, pools = engine.rank([dialogue])
    asked = engine.asker.ask(RoundContext(round_, [dialogue], feats,
                                          pools[:, : engine.pool_size], ranks))[0]
    return {"top": engine.gallery.image_idx[pools[0, :TOP_K]].tolist(),
            "question": asked.question, "candidates": list(asked.candidates),
            "target_rank": int(ranks[0])}


def expected_dialogue(engine, dialogue: Dialogue, answers: list[str]) -> list[dict]:
    out = [expected_round(engine, dialogue, 0)]
    for r, answer in enumerate(answers, start=1):
        advance(dialogue, out[-1]["question"], answer)
        out.append(expected_round(engine, dialogue, r))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """`llava-reid demo` on the tiny run, protected by an access token."""
    sessions = tmp_path_factory.mktemp("sessions")
    port = free_port()
    cmd = [sys.executable, "-m", "llava_reid.cli", "demo", "--config", str(tiny_run["cfg_file"]),
           "--run", str(tiny_run["run"]), "--port", str(port), "--sessions", str(sessions)]
    env = {**os.environ, "LLAVA_REID_DEMO_TOKEN": TOKEN}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
    url = None
    deadline = time.time() + 300
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if match := re.search(r"witness page: (http://\S+?/)", line):
            url = match.group(1)
            break
    if url is None:
        proc.kill()
        raise AssertionError("the demo server did not start:\n" + "".join(lines[-40:]))
    yield {"url": url, "sessions": sessions, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


def test_snakemake_demo_builds_the_run_and_prints_the_command(tiny_run, tmp_path):
    run, printed = tiny_run["run"], tiny_run["printed"]
    for rel in ("retriever/model", "features/test_gallery.parquet", "joint/adapter",
                "joint/selector.safetensors", "questioner/visual_tokens/test.safetensors",
                "eval/selector/dialogues.parquet"):
        assert (run / rel).exists(), rel
    # Only what the demo needs: from nothing, `snakemake demo` plans the selector's evaluation
    # and no other method's, nor the report's figures. (The shared run was built in full.)
    cfg = tiny_run["cfg"]
    dry = dry_run(tmp_path, write_config(tmp_path / "demo-config.yaml", cfg), args=["demo"])
    jobs = planned_jobs(dry)
    rules = {rule for rule, _ in jobs}
    assert {"train_joint", "evaluate", "merge_eval", "demo"} <= rules, rules
    assert not rules & {"plots", "ranked_lists", "training_curves"}, rules
    assert len(cfg["evaluate"]["methods"]) > 1
    assert {re.search(r"\bmethod=(\w+)", w).group(1) for r, w in jobs
            if r in ("evaluate", "merge_eval")} == {"selector"}
    assert f"llava-reid demo --run {run.relative_to(run.parents[1])}\n" in printed
    # The config Snakemake ran on is kept in the run: `llava-reid demo --run` needs no other.
    saved = yaml.safe_load((run / "witness/config.yaml").read_text())
    assert saved["dialogue"] == tiny_run["cfg"]["dialogue"]
    assert saved["questioner"]["tiny"] == tiny_run["cfg"]["questioner"]["tiny"]


def test_page_follows_the_dialogue_engine(server, engine, tiny_run, tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed (see .ci/run)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    shots = os.environ.get("LLAVA_REID_DEMO_SCREENSHOTS")
    before = set(server["sessions"].glob("*.parquet"))
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server["url"] + f"?token={TOKEN}")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query-select option"))

        def shown(round_: int) -> dict:
            wait.until(lambda d: d.find_element(By.ID, "round").get_attribute("data-round")
                       == str(round_) and d.execute_script("return document.body.dataset.busy")
                       == "0")
            cards = driver.find_elements(By.CSS_SELECTOR, "#ranking figure")
            return {
                "top": [int(c.get_attribute("data-image-idx")) for c in cards],
                "ranks": [int(c.get_attribute("data-rank")) for c in cards],
                "candidates": [int(c.get_attribute("data-image-idx")) for c in cards
                               if c.get_attribute("data-candidate") == "1"],
                "question": driver.find_element(By.ID, "question").text,
            }

        driver.find_element(By.ID, "description").send_keys(DESCRIPTION)
        driver.find_element(By.ID, "search-btn").click()
        seen = [shown(0)]
        if shots:
            driver.save_screenshot(str(Path(shots) / "demo-round0.png"))
        for r, answer in enumerate(ANSWERS, start=1):
            driver.find_element(By.ID, "answer-input").send_keys(answer)
            driver.find_element(By.ID, "answer-btn").click()
            seen.append(shown(r))
        if shots:
            driver.save_screenshot(str(Path(shots) / "demo-round2.png"))
        history = driver.find_elements(By.CSS_SELECTOR, "#history tbody tr")
        assert [row.find_elements(By.TAG_NAME, "td")[2].text for row in history] == \
            [*ANSWERS, ""]
        picked = seen[-1]["top"][0]
        driver.find_element(By.CSS_SELECTOR, "#ranking figure button").click()
        wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
        done = driver.find_element(By.ID, "done").text
    finally:
        driver.quit()

    dialogue = Dialogue(query_id=-1, pid=-1, initial=DESCRIPTION, memory="",
                        annotated_questions=(), annotated_answers=())
    want = expected_dialogue(engine, dialogue, ANSWERS)
    for r, (got, exp) in enumerate(zip(seen, want, strict=True)):
        assert got["ranks"] == list(range(1, TOP_K + 1)), r
        assert got["top"] == exp["top"], f"round {r}: page {got['top']} != engine {exp['top']}"
        assert got["question"] == exp["question"], r
        # The page marks exactly the candidates the selector gave the questioner (those in
        # the top-k; the selector may reach deeper into the pool).
        assert got["candidates"] == [i for i in exp["top"] if i in exp["candidates"]], r
        assert exp["candidates"][0] == exp["top"][0]  # the top-1 is always shown
    assert seen[0]["top"] != seen[2]["top"], "the answers should change the ranking"
    assert f"You picked image {picked}" in done

    files = sorted(set(server["sessions"].glob("*.parquet")) - before)
    assert len(files) == 1
    table = read_table(files[0], "dialogues")  # a witness session reads as dialogue rows
    assert read_metadata(files[0])["kind"] == "witness_dialogues"
    rows = table.to_pandas().sort_values("round")
    assert rows["round"].tolist() == [0, 1, 2]
    assert rows["answer"].tolist() == [*ANSWERS, ""]
    assert rows["answered_by"].tolist() == ["person", "person", ""]
    assert rows["question"].tolist() == [want[0]["question"], want[1]["question"], ""]
    assert [list(x) for x in rows["top_k"]] == [w["top"] for w in want]
    assert (rows["picked"] == picked).all()
    gallery = Gallery.from_parquet(str(tiny_run["run"] / "features/test_gallery.parquet"))
    picked_pid = int(gallery.pids[gallery.position_of()[picked]])
    # The pick names the target of a free session: its ranks are the picked identity's.
    assert (rows["pid"] == picked_pid).all() and rows["target_rank"].iloc[-1] == 1
    per_round, _ = round_metrics(table, gallery)  # scored like an evaluation
    assert [p["round"] for p in per_round] == [0, 1, 2] and per_round[-1]["R1"] == 100.0


def _request(url: str, body: dict | None = None, token: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_token_and_bad_requests(server):
    url = server["url"]
    assert _request(url + "api/info")[0] == 401
    assert _request(url + "image/0")[0] == 401
    assert _request(url + "api/info", token="wrong")[0] == 401
    status, body = _request(url + "api/info", token=TOKEN)
    assert status == 200 and json.loads(body)["method"] == "selector"
    status, body = _request(url + "api/sessions", {"description": "  "}, token=TOKEN)
    assert status == 400 and "description" in json.loads(body)["error"]
    status, body = _request(url + "api/sessions", {"query_id": 987654}, token=TOKEN)
    assert status == 400 and "987654" in json.loads(body)["error"]
    assert _request(url + "image/999999", token=TOKEN)[0] == 404
    # A pick outside the gallery is refused and leaves the session as it was.
    status, body = _request(url + "api/sessions", {"description": DESCRIPTION}, token=TOKEN)
    assert status == 200
    start = json.loads(body)
    status, body = _request(url + f"api/sessions/{start['session_id']}/finish",
                            {"image_idx": 999999}, token=TOKEN)
    assert status == 400 and "999999" in json.loads(body)["error"]
    status, body = _request(url + f"api/sessions/{start['session_id']}", token=TOKEN)
    now = json.loads(body)
    assert not now["finished"] and now["question"] == start["question"] != ""
    assert _request(url + "image/..%2fetc%2fpasswd", token=TOKEN)[0] == 404


def _chat(tiny_run, stdin: str, *args: str, sessions: Path, config: bool = True) -> str:
    cmd = [sys.executable, "-m", "llava_reid.cli", "chat", "--run", str(tiny_run["run"]),
           "--sessions", str(sessions), *args]
    if config:
        cmd += ["--config", str(tiny_run["cfg_file"])]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_chat_in_the_terminal(tiny_run, engine, tmp_path):
    out = _chat(tiny_run, f"{DESCRIPTION}\n{ANSWERS[0]}\n\npick 2\n", sessions=tmp_path)
    want = expected_dialogue(engine, Dialogue(-1, -1, DESCRIPTION, "", (), ()),
                             [ANSWERS[0], "I don't know"])
    blocks = re.split(r"\n== round ", out)[1:]
    assert len(blocks) == 3
    for r, (block, exp) in enumerate(zip(blocks, want, strict=True)):
        ids = [int(m) for m in re.findall(r"^[ *]\s*\d+\. image (\d+)", block, re.M)]
        assert ids == exp["top"], r
        marked = [int(m) for m in re.findall(r"^\*\s*\d+\. image (\d+)", block, re.M)]
        assert marked == [i for i in exp["top"] if i in exp["candidates"]]
        assert f"question: {exp['question']}" in block
        paths = re.findall(r"score [\d.-]+\s+(\S+\.png)$", block, re.M)
        assert len(paths) == TOP_K and all(Path(p).is_file() for p in paths)
    # "I don't know" adds nothing: rounds 1 and 2 rank alike.
    assert want[1]["top"] == want[2]["top"]
    assert f"picked image {want[2]['top'][1]}" in out
    rows = pd.read_parquet(next(tmp_path.glob("*.parquet"))).sort_values("round")
    assert rows["answer"].tolist() == [ANSWERS[0], "I don't know", ""]
    assert rows["answered_by"].tolist() == ["person", "person", ""]


def test_chat_replay_matches_the_evaluation(tiny_run, tmp_path):
    """Replay a test query with the config saved in the run: round 0 is the evaluation's own
    round 0 (same query, same rank, same question); stopping at once saves one final round."""
    sim = pd.read_parquet(tiny_run["run"] / "eval/selector/dialogues.parquet")
    first = sim[sim["round"] == 0].sort_values("query_id").iloc[0]
    out = _chat(tiny_run, "stop\n", "--query", str(int(first.query_id)), sessions=tmp_path,
                config=False)  # the run's own saved config
    assert f"target rank: {int(first.target_rank)}\n" in out
    assert f"question: {first.question}\n" in out
    assert f"simulated answerer, round 0: rank {int(first.target_rank)}" in out
    rows = pd.read_parquet(next(tmp_path.glob("*.parquet")))
    assert len(rows) == 1 and rows["query_id"].iloc[0] == first.query_id
    assert rows["target_rank"].iloc[0] == first.target_rank
    assert list(rows["top_k"].iloc[0]) == list(first.top_k)


def test_run_without_artifacts_is_a_clear_error(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(small_config()))
    proc = subprocess.run([sys.executable, "-m", "llava_reid.cli", "demo", "--config",
                           str(cfg_file), "--run", str(tmp_path / "nothing"), "--check"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert "retriever" in proc.stderr and "snakemake demo" in proc.stderr



@pytest.mark.parametrize(("train_projector", "method", "tokens"), [
    (False, "selector", "questioner/visual_tokens/test.safetensors"),
    (False, "questioner", "questioner/visual_tokens/test.safetensors"),
    (True, "selector", "joint/visual_tokens/test.safetensors"),
    (True, "questioner", "questioner/visual_tokens/test.safetensors"),
])
def test_demo_reads_the_visual_tokens_of_its_adapters_projector(tmp_path, train_projector,
                                                                method, tokens):
    """As the workflow's evaluation does (rules/common.smk, method_visual_tokens)."""
    from llava_reid.witness.run_files import RunFiles

    cfg = small_config()
    cfg["questioner"]["train_projector"] = train_projector
    files = RunFiles.locate(tmp_path, cfg, method)
    assert files.visual_tokens == tmp_path / tokens
    assert files.adapter == tmp_path / ("joint/adapter" if method == "selector"
                                        else "questioner/adapter")
