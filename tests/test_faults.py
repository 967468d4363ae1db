"""Fault injection: corrupted artifacts, bad configs, a flaky answerer server, read-only and
full disks, the umask, a non-UTF-8 locale and float64 near-ties. Each failure must be one clear
line naming what to fix, and nothing half-written may be left behind.

Full and read-only disks are real tmpfs mounts where this process may mount them (root with
CAP_SYS_ADMIN, as in CI), else the same errno is injected at the write.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llava_reid import artifacts, cli
from llava_reid.answerer import AnswerBatchError, AnswerRequest
from llava_reid.answerer.openai_compat import OpenAIAnswerer
from llava_reid.artifacts import (
    ArtifactError,
    ArtifactWriteError,
    atomic_dir,
    read_table,
    write_json,
    write_table,
)
from llava_reid.config import ConfigError, check_workflow_config, load_config
from llava_reid.dialogue.merge import merge_chunks
from llava_reid.metrics import rank_metrics, target_ranks
from llava_reid.retriever.model import load_clip
from llava_reid.selector.model import Selector
from tests.conftest import REPO, base_config, llava_reid, small_config

pytestmark = pytest.mark.faults


def _gallery_table(rows: int = 3000, dim: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image_idx": np.arange(rows, dtype=np.int32),
        "pid": np.arange(rows, dtype=np.int64) // 2,
        "file_path": [f"images/{i:05d}.png" for i in range(rows)],
        "feat": list(rng.standard_normal((rows, dim)).astype(np.float32)),
    }


def _flip_middle(path: Path, count: int = 64, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    noise = np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()
    # XOR with a non-zero pattern so every byte really changes.
    data[mid : mid + count] = bytes((a ^ (b | 1)) for a, b in zip(data[mid : mid + count], noise,
                                                                   strict=True))
    path.write_bytes(bytes(data))


def _one_error_line(stderr: str, *needles: str) -> str:
    """The stage's error line; asserts it is a single line with no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# =========================================================================================
# Corrupted artifacts


def test_parquet_flipped_bytes_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "train_gallery.parquet"
    write_table(_gallery_table(), path, "gallery_features", config_hash="x", producer="test")
    before = read_table(path, "gallery_features")
    _flip_middle(path)
    with pytest.raises(ArtifactError, match=str(path)) as err:
        read_table(path, "gallery_features")
    assert "corrupt" in str(err.value).lower()
    assert before.num_rows == 3000


def _dialogues_table(n: int, dim: int, offset: int = 0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"query_id": np.arange(offset, offset + n, dtype=np.int32),
            "pid": np.arange(offset, offset + n, dtype=np.int64),
            "round": np.zeros(n, np.int8), "query": [f"a person {i}" for i in range(n)],
            "target_rank": np.ones(n, np.int32), "top_k": [[0]] * n, "candidates": [[]] * n,
            "seen_images": [[]] * n, "question": [""] * n, "answer": [""] * n,
            "query_feat": list(rng.standard_normal((n, dim)).astype(np.float32))}


def test_parquet_corruption_through_a_stage_is_one_line(tmp_path):
    """merge-eval reading a corrupted evaluation chunk: one line naming it, exit 1."""
    n = 2000
    queries = tmp_path / "test_queries.parquet"
    feats = list(np.zeros((n, 8), np.float32))
    write_table({"query_id": np.arange(n, dtype=np.int32), "pid": np.arange(n, dtype=np.int64),
                 "image_idx": np.arange(n, dtype=np.int32),
                 "initial_description": ["a person"] * n, "initial_feat": feats,
                 "fine_grained_feat": feats},
                queries, "query_features", config_hash="x", producer="test")
    chunk = tmp_path / "0-of-1.parquet"
    write_table(_dialogues_table(n, 32), chunk, "dialogues", config_hash="x", producer="test")
    _flip_middle(chunk)
    proc = llava_reid("merge-eval", "--method", "oracle", "--chunks", str(chunk),
                      "--gallery", str(tmp_path / "g.parquet"), "--queries", str(queries),
                      "--out", str(tmp_path / "d.parquet"), "--metrics", str(tmp_path / "m.json"),
                      cfg={"seed": 1, "device": "cpu"}, check=False)
    assert proc.returncode == 1
    _one_error_line(proc.stderr, str(chunk), "corrupted")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "d.parquet").exists()


def test_safetensors_truncated_or_corrupted_names_the_file(tmp_path):
    selector = Selector(dim=16, heads=2, layers=1, ffn=16, dropout=0.0)
    path = Path(selector.save(tmp_path / "selector.safetensors"))
    assert Selector.load(path) is not None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # truncated: the job died mid-copy
    with pytest.raises(ArtifactError, match=str(path)):
        Selector.load(path)
    broken = bytearray(data)
    broken[12:40] = b"\xff" * 28  # a corrupted header
    path.write_bytes(bytes(broken))
    with pytest.raises(ArtifactError, match=str(path)):
        Selector.load(path)
    flipped = bytearray(data)
    flipped[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # flipped bytes in the weights
    assert bytes(flipped) != data
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match=f"{path}: corrupted selector"):
        Selector.load(path)


def test_load_clip_names_a_missing_or_truncated_model(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 8},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "projection_dim": 8},
        projection_dim=8)
    folder = tmp_path / "model"
    CLIPModel(config).save_pretrained(folder)
    assert load_clip(folder) is not None
    with pytest.raises(ArtifactError, match=str(tmp_path / "nowhere")):
        load_clip(tmp_path / "nowhere")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-256])
    with pytest.raises(ArtifactError, match=str(folder)):
        load_clip(folder)


def test_merging_chunks_of_different_embedding_sizes_names_them(tmp_path):
    chunks = []
    for i, dim in enumerate((8, 16)):
        path = tmp_path / f"{i}-of-2.parquet"
        write_table(_dialogues_table(1, dim, offset=i), path, "dialogues", config_hash="x",
                    producer="test")
        chunks.append(str(path))
    with pytest.raises(ArtifactError, match="different query embedding sizes") as err:
        merge_chunks(chunks, [0, 1])
    assert f"{chunks[0]} (8)" in str(err.value) and f"{chunks[1]} (16)" in str(err.value)


# =========================================================================================
# Bad configs: one clear line before any job


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


BAD_CONFIGS = {
    # name -> (edit, what the line must say)
    "schema-type": (lambda c: c["dialogue"].update(pool_size="many"),
                    "dialogue.pool_size: 'many' is not of type 'integer'"),
    "schema-unknown-key": (lambda c: c["retriever"].update(epoch=3),
                           "retriever: Additional properties are not allowed ('epoch'"),
    "cross-field": (lambda c: c["dialogue"].update(num_candidates=30),
                    "dialogue.num_candidates (30) must be <= dialogue.pool_size (20)"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_stops_the_workflow_with_one_line(tmp_path, name):
    edit, expected = BAD_CONFIGS[name]
    cfg = small_config()
    cfg["results"] = str(tmp_path / "results")
    edit(cfg)
    path = _write_config(tmp_path / "bad.yaml", cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    problem = [ln for ln in proc.stderr.splitlines() if expected in ln]
    assert len(problem) == 1 and problem[0].startswith(f"config: {expected}"), proc.stderr
    assert "Traceback" not in proc.stderr and "Failed validating" not in proc.stderr
    assert "Job stats" not in proc.stdout + proc.stderr  # no job was planned
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_stops_a_stage_with_one_line(tmp_path, name):
    edit, expected = BAD_CONFIGS[name]
    cfg = small_config()
    edit(cfg)
    path = _write_config(tmp_path / "bad.yaml", cfg)
    out = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "llava_reid.cli", "synthesize", "--config",
                           str(path), "--out-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    _one_error_line(proc.stderr, str(path), expected)
    assert not out.exists()


def test_cross_field_check_on_a_stage_view():
    """What the rules pass (a view of a few sections) is checked as far as it goes."""
    cfg = small_config()
    view = {"seed": 1, "device": "cpu", "dialogue": {**cfg["dialogue"], "num_candidates": 21},
            "prepare": cfg["prepare"]}
    with pytest.raises(ConfigError, match=r"num_candidates \(21\) must be <= "):
        load_config(json.dumps(view))


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["evaluate"].update(methods=["selector"]) or
     c["dialogue"].update(num_candidates=1), "must be >= 2 when evaluate.methods has 'selector'"),
    (lambda c: c["data"].update(source="annotations"), "data.annotations must be set"),
    (lambda c: c["answerer"].update(kind="openai"), "answerer.openai.base_url must be set"),
    (lambda c: c["selector"].update(heads=3), "retriever.tiny.embed_dim (128) must be "
                                              "divisible by selector.heads (3)"),
    (lambda c: c["questioner"]["tiny"].update(heads=3), "questioner.tiny.hidden_size"),
    (lambda c: c["retriever"].update(batch_size=4096), "retriever.batch_size (4096) must be <="),
    (lambda c: c["evaluate"].update(chunks=10**6), "evaluate.chunks (1000000) must be <="),
    (lambda c: c["prepare"].update(min_remaining=50), "prepare.min_remaining (50) must be <="),
    (lambda c: c["retriever"]["text_views"].update(initial=0.7, partial=0.7),
     "text_views.initial + partial"),
    (lambda c: c["retriever"]["losses"].update(sdm=0, id=0, mlm=0), "at least one of"),
])
def test_cross_field_checks(edit, expected):
    cfg = base_config()
    check_workflow_config(cfg)  # the embedded default is consistent
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        check_workflow_config(cfg, "config.yaml")
    first = str(err.value).splitlines()[0]
    assert first.startswith("config.yaml: ") and expected in first, first


# =========================================================================================
# A flaky answerer server


class FlakyServer(ThreadingHTTPServer):
    """Loopback chat-completions server that misbehaves in a scripted order: each request
    takes the next entry of ``script`` ("ok", "500", "timeout", "garbage", "401"); the last
    entry repeats."""

    daemon_threads = True

    def __init__(self, script: list[str]):
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        self.script = list(script)
        self.seen: list[str] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyServer

    def log_message(self, fmt, *args):
        pass

    def _send(self, status: int, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        srv = self.server
        with srv.lock:
            action = srv.script.pop(0) if len(srv.script) > 1 else srv.script[0]
            srv.seen.append(action)
        question = body["messages"][-1]["content"].rsplit("Question: ", 1)[-1]
        if action == "500":
            return self._send(500, b"<html>\n<body>Internal Server Error</body>\n</html>")
        if action == "401":
            return self._send(401, b'{"error": {"message": "Invalid API Key"}}')
        if action == "garbage":
            return self._send(200, b'{"choices": [{"message": {"content": "trunc')
        if action == "timeout":
            time.sleep(1.5)
        reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                      "content": f"You asked: {question}"}}]}
        self._send(200, json.dumps(reply).encode())


@pytest.fixture
def flaky():
    servers = []

    def start(script):
        srv = FlakyServer(script)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _requests(n: int) -> list[AnswerRequest]:
    return [AnswerRequest(f"r{i}", i, f"What colour was the coat number {i}?", "I saw a man.",
                          ("q",), ("a",)) for i in range(n)]


def _client(srv, **kw) -> OpenAIAnswerer:
    kw = {"max_concurrency": 1, "timeout_s": 0.5, "max_retries": 3, "backoff_s": 0.01,
          "api_key_env": "LLAVA_REID_TEST_NO_SUCH_KEY", **kw}
    return OpenAIAnswerer(srv.base_url, "m", **kw)


def test_flaky_server_is_retried_to_the_right_answers(flaky):
    srv = flaky(["500", "ok", "timeout", "ok", "garbage", "ok", "ok"])
    client = _client(srv)
    answers = client.answer(_requests(4))
    assert answers == [f"You asked: What colour was the coat number {i}?" for i in range(4)]
    assert client.requests_sent == 7
    assert srv.seen.count("ok") == 4


@pytest.mark.parametrize("script, needles", [
    (["500"], ["answered HTTP 500", "Internal Server Error", "after 4 attempt(s)"]),
    (["timeout"], ["did not answer within 0.5 s after 4 attempt(s)", "timeout_s"]),
    (["garbage"], ["unusable reply", "not JSON"]),
    (["401"], ["rejected the API key (HTTP 401)", "LLAVA_REID_TEST_NO_SUCH_KEY"]),
])
def test_failing_server_gives_one_clear_line(flaky, script, needles):
    srv = flaky(script)
    with pytest.raises(AnswerBatchError) as err:
        _client(srv).answer(_requests(2))
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    if script == ["401"]:
        assert srv.seen == ["401"]  # never retried: the key will not get better


def test_unreachable_server_gives_one_clear_line():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OpenAIAnswerer(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.01)
    with pytest.raises(AnswerBatchError, match="unreachable after 2 attempt") as err:
        client.answer(_requests(1))
    assert "\n" not in str(err.value)


# =========================================================================================
# The CLI: one line for expected failures, the traceback for bugs and with --verbose


def _cli_failing_with(monkeypatch, exc: BaseException):
    def stage(cfg, **kwargs):
        raise exc

    monkeypatch.setattr(cli, "_resolve", lambda module, function: stage)


@pytest.mark.parametrize("exc, needle", [
    (ArtifactError("/r/features/x.parquet: corrupted Parquet artifact"), "x.parquet"),
    (ArtifactWriteError(errno.ENOSPC, "/r/eval/m.json: cannot write: the disk is full"),
     "the disk is full"),
    (OSError(errno.ENOSPC, "No space left on device", "/r/big.bin"),
     "/r/big.bin: the disk is full"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/in.json"),
     "/r/in.json: No such file or directory"),
    (AnswerBatchError("answerer server at http://h/v1 is unreachable", {}), "unreachable"),
])
def test_cli_prints_one_line_for_expected_failures(monkeypatch, capsys, exc, needle):
    _cli_failing_with(monkeypatch, exc)
    args = ["synthesize", "--config", '{"seed": 1, "device": "cpu"}', "--out-dir", "/r"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    _one_error_line(err, "llava-reid synthesize: error: ", needle)
    assert cli.main(["--verbose", *args]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    _cli_failing_with(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["synthesize", "--config", '{"seed": 1, "device": "cpu"}', "--out-dir", "/r"])


def test_cli_help_version_and_choices(capsys):
    parser = cli._build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert capsys.readouterr().out.strip() == "llava-reid 0.1.0"
    assert "``" not in parser.format_help()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        assert "``" not in sub.format_help(), name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
        flags = {f: a for a in sub._actions for f in a.option_strings}
        if "--method" in flags:
            assert set(flags["--method"].choices) == {"initial", "random", "oracle",
                                                      "questioner", "selector"}, name
        if "--split" in flags:
            assert set(flags["--split"].choices) == {"train", "val", "test"}, name
    for action in parser._actions:
        assert action.help, action.option_strings


# =========================================================================================
# Full and read-only disks


def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    if ok and read_only:
        ok = subprocess.run(["mount", "-o", "remount,ro", str(path)],
                            capture_output=True).returncode == 0
    return ok


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(name: str, size: str = "256k", read_only: bool = False) -> Path | None:
        path = tmp_path / name
        if not _mount_tmpfs(path, size, read_only):
            return None
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], capture_output=True)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_full_disk_is_named_and_leaves_the_old_artifact(tmp_path, tmpfs, monkeypatch):
    folder = tmpfs("full", size="96k")
    if folder is None:  # no mount permission: inject ENOSPC where pyarrow writes
        folder = tmp_path / "full"
        folder.mkdir()
        real = artifacts.pq.write_table

        def full(table, where, **kw):
            if table.num_rows > 100:
                Path(where).write_bytes(b"PAR1 partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(table, where, **kw)

        monkeypatch.setattr(artifacts.pq, "write_table", full)
    path = folder / "train_gallery.parquet"
    write_table(_gallery_table(rows=10), path, "gallery_features", config_hash="old",
                producer="test")
    with pytest.raises(ArtifactWriteError, match="the disk is full") as err:
        write_table(_gallery_table(rows=20000), path, "gallery_features", config_hash="new",
                    producer="test")
    assert str(path) in str(err.value) and err.value.errno == errno.ENOSPC
    assert read_table(path, "gallery_features").num_rows == 10  # the old one, intact
    assert _leftovers(folder) == []


def test_full_disk_through_a_stage_is_one_line(tmp_path, tmpfs):
    folder = tmpfs("full", size="64k")
    if folder is None:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the "
                    "injected-ENOSPC tests above cover the same code path")
    proc = llava_reid("synthesize", "--out-dir", str(folder / "data"), cfg=small_config(),
                      check=False)
    assert proc.returncode == 1
    _one_error_line(proc.stderr, "the disk is full", str(folder / "data"))
    assert not (folder / "data" / "annotations.json").exists()
    assert _leftovers(folder / "data") == []


def test_read_only_output_folder_is_named(tmp_path, tmpfs, monkeypatch):
    folder = tmpfs("ro", read_only=True)
    if folder is None:  # root ignores mode bits: inject the errno a read-only mount gives
        folder = tmp_path / "ro"
        folder.mkdir()

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(folder))

        monkeypatch.setattr(artifacts.tempfile, "mkstemp", read_only)
        monkeypatch.setattr(artifacts.tempfile, "mkdtemp", read_only)
    with pytest.raises(ArtifactWriteError, match="read-only") as err:
        write_json({"a": 1}, folder / "metrics.json")
    assert str(folder / "metrics.json") in str(err.value)
    with pytest.raises(ArtifactWriteError, match="read-only"), atomic_dir(folder / "model"):
        pass
    assert list(folder.iterdir()) == []


# =========================================================================================
# Permissions, encodings, precision


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_artifacts_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json({"a": 1}, tmp_path / "m.json")
        write_table(_gallery_table(rows=4), tmp_path / "g.parquet", "gallery_features",
                    config_hash="x", producer="test")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights.bin").write_bytes(b"0")
    finally:
        os.umask(old)
    for name in ("m.json", "g.parquet"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask


def test_a_stage_respects_the_umask(tmp_path):
    out = tmp_path / "data"
    cfg = small_config()
    cfg = {"seed": 1, "device": "cpu", "data": cfg["data"]}  # what the rule passes
    cfg["data"]["synthetic"]["identities"] = {"train": 2, "val": 1, "test": 1}
    proc = subprocess.run(
        [sys.executable, "-m", "llava_reid.cli", "synthesize", "--config", json.dumps(cfg),
         "--out-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.umask(0o002))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((out / "annotations.json").stat().st_mode) == 0o664
    assert stat.S_IMODE((out / "images").stat().st_mode) == 0o775


ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                "PYTHONIOENCODING": "ascii:backslashreplace"}


def test_text_is_read_as_utf8_under_an_ascii_locale(tmp_path, small_dataset):
    env = {**os.environ, **ASCII_LOCALE}
    probe = subprocess.run([sys.executable, "-c",
                            "import locale; print(locale.getpreferredencoding(False))"],
                           env=env, capture_output=True, text=True)
    assert "UTF" not in probe.stdout.upper(), probe.stdout  # the locale really is not UTF-8

    # A config file with non-ASCII text (a comment and a value).
    cfg = small_config()
    cfg["results"] = str(tmp_path / "résultats")
    config = tmp_path / "config.yaml"
    config.write_text("# Zürich, café: non-ASCII on purpose\n"
                      + yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    # An annotation file with non-ASCII descriptions.
    records = json.loads((small_dataset["root"] / "annotations.json").read_text(encoding="utf-8"))
    for rec in records:
        rec["initial_description"] = rec["initial_description"] + " Naïve café façade."
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "annotations.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "llava_reid.cli", "load-annotations", "--config", str(config),
         "--annotations", str(annotations), "--image-root", str(small_dataset["root"]),
         "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    texts = read_table(out, "annotations").column("initial_description").to_pylist()
    assert all(t.endswith(" Naïve café façade.") for t in texts)


def test_metrics_rank_float64_near_ties_in_their_precision():
    # Two gallery images 1e-12 apart: float32 would make them a tie and put index 0 first.
    sim = torch.tensor([[0.5, 0.5 + 1e-12, 0.1], [0.5 + 1e-12, 0.5, 0.1]], dtype=torch.float64)
    qp, gp = torch.tensor([1, 0]), torch.tensor([0, 1, 2])
    assert target_ranks(sim, qp, gp).tolist() == [1, 1]
    assert rank_metrics(sim, qp, gp, ks=(1,))["R1"] == 100.0
    assert rank_metrics(sim.float(), qp, gp, ks=(1,))["R1"] == 50.0  # what the cast gave
    # Integer and low-precision scores still rank.
    assert target_ranks(torch.tensor([[3, 7, 1]]), torch.tensor([1]), gp).tolist() == [1]
    for dtype in (torch.float16, torch.bfloat16):
        assert target_ranks(sim.to(dtype), qp, gp).tolist() == [2, 1]


def test_stage_logs_have_no_progress_bar_noise(tmp_path, small_dataset):
    """Weight loading writes no carriage returns into a log (stderr is not a TTY)."""
    from llava_reid.retriever.encoder import write_settings

    cfg = copy.deepcopy(small_dataset["cfg"])
    # CLIP's square position grid: loaded with from_pretrained, whose bars the control needs
    # (a sine-cosine grid loads its safetensors directly, without a bar).
    cfg["retriever"]["tiny"]["position_init"] = "random"
    model = tmp_path / "retriever"
    llava_reid("init-retriever", "--annotations", str(small_dataset["annotations"]),
               "--out", str(model), cfg=cfg)
    write_settings(model, cfg["retriever"])  # an untrained retriever is enough to load
    cmd = [sys.executable, "-m", "llava_reid.cli", "cache-features", "--config", json.dumps(cfg),
           "--annotations", str(small_dataset["annotations"]),
           "--image-root", str(small_dataset["root"]), "--model", str(model), "--split", "test",
           "--gallery-out", str(tmp_path / "g.parquet"),
           "--queries-out", str(tmp_path / "q.parquet")]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    # Bytes, not text: universal newlines would turn the bars' \r into \n.
    log = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert log.returncode == 0, log.stderr.decode()
    assert b"\r" not in log.stderr and b"Loading weights" not in log.stderr
    assert read_table(tmp_path / "g.parquet", "gallery_features").num_rows > 0
    # The control: with the bars switched on explicitly, the same load draws them.
    shown = subprocess.run(cmd, cwd=REPO, env={**env, "HF_HUB_DISABLE_PROGRESS_BARS": "0"},
                           capture_output=True, timeout=300)
    assert b"\r" in shown.stderr and b"Loading weights" in shown.stderr
