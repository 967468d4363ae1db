"""Witness served by SGLang, started by the evaluation job itself when no server is given.

On a cluster the evaluate job holds its GPUs; rather than asking the user to run a server by
hand, the job launches ``python -m sglang.launch_server`` on one of its GPUs, waits for
``/health``, talks to it through ``OpenAIAnswerer`` and stops it at the end. The server gets
its own process group (so stopping it also stops its scheduler and detokenizer workers), a log
file, a random API key unless one is configured, and is stopped at interpreter exit if nobody
called ``close()``.

The server is launched when the answerer is built but waited for only at the first question, so
loading the questioner and loading the answerer model overlap.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from llava_reid.answerer.base import AnswererError, AnswerRequest, request_settings
from llava_reid.answerer.openai_compat import OpenAIAnswerer
from llava_reid.answerer.runtime_check import SGLANG_PYTHON_ENV

log = logging.getLogger(__name__)

SGLANG_LAUNCHER = (sys.executable, "-m", "sglang.launch_server")
HOST = "127.0.0.1"


def default_launcher() -> list[str]:
    """SGLang pins its own torch/transformers, so it usually lives in an environment of its own:
    $LLAVA_REID_SGLANG_PYTHON names that environment's Python (the workflow sets it)."""
    python = os.environ.get(SGLANG_PYTHON_ENV)
    return [python, "-m", "sglang.launch_server"] if python else list(SGLANG_LAUNCHER)


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def visible_gpu(gpu: int | None, environ: dict[str, str] | None = None) -> str | None:
    """CUDA_VISIBLE_DEVICES for the server: ``gpu`` indexes the GPUs this process may use
    (under SLURM CUDA_VISIBLE_DEVICES may be "2,3", so gpu 0 is device 2)."""
    if gpu is None:
        return None
    environ = os.environ if environ is None else environ
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return str(int(gpu))
    if not 0 <= int(gpu) < len(visible):
        raise ValueError(f"answerer.sglang.gpu={gpu} but only {len(visible)} GPU(s) are visible "
                         f"(CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']})")
    return visible[int(gpu)]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


class SGLangServer:
    """One ``sglang.launch_server`` subprocess on loopback.

    ``launcher`` is the command prefix (default: the module's ``SGLANG_LAUNCHER``, i.e.
    ``python -m sglang.launch_server``); tests put a stand-in server script there. The arguments appended are SGLang's own flags.
    """

    def __init__(
        self,
        model_path: str,
        *,
        port: int = 30000,
        gpu: int | None = 0,
        mem_fraction_static: float = 0.8,
        api_key: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 900.0,
        log_path: str | Path | None = None,
        launcher: Sequence[str] | None = None,
        stop_grace_s: float = 30.0,
    ):
        if not model_path:
            raise ValueError("answerer.sglang.model_path is not set (a local model folder)")
        self.model_path = str(model_path)
        self.port = int(port) or free_port()
        self.gpu = gpu
        self.mem_fraction_static = float(mem_fraction_static)
        # hex, not urlsafe: a generated key starting with "-" made the server's argparse
        # read it as an option ("--api-key: expected one argument").
        self.api_key = api_key or secrets.token_hex(24)
        self.extra_args = [str(a) for a in extra_args]
        self.startup_timeout_s = float(startup_timeout_s)
        self.launcher = list(default_launcher() if launcher is None else launcher)
        self.stop_grace_s = float(stop_grace_s)
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix="sglang-server-", suffix=".log")
            os.close(fd)
            log_path = tmp
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._ready = False

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def command(self) -> list[str]:
        return [*self.launcher, "--model-path", self.model_path, "--host", HOST,
                "--port", str(self.port), f"--api-key={self.api_key}",
                "--mem-fraction-static", f"{self.mem_fraction_static:g}", *self.extra_args]

    def start(self) -> None:
        """Launch the server (does not wait; see ``wait_ready``)."""
        if self.proc is not None:
            return
        if port_in_use(self.port):
            raise AnswererError(
                f"cannot start SGLang: port {self.port} on {HOST} is already in use. Set "
                f"answerer.sglang.port to a free port (0 picks one), or point "
                f"answerer.openai.base_url at the server that is running there.")
        env = dict(os.environ)
        cuda = visible_gpu(self.gpu)
        if cuda is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        shown = ["--api-key=***" if c.startswith("--api-key=") else c for c in cmd]
        log.info("starting answerer server: %s (CUDA_VISIBLE_DEVICES=%s, log %s)",
                 " ".join(shown), cuda, self.log_path)
        with open(self.log_path, "ab") as logf:
            logf.write(f"$ {' '.join(shown)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)  # own process group
        atexit.register(self.stop)

    def _healthy(self) -> bool:
        req = urllib.request.Request(f"http://{HOST}:{self.port}/health",
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, poll_s: float = 1.0) -> None:
        """Block until ``/health`` answers 200; error (with the log's tail) if the server exits
        or does not get ready within ``startup_timeout_s``."""
        if self._ready:
            return
        self.start()
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        started = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise AnswererError(
                    f"SGLang server exited with code {code} before it was ready. Last lines of "
                    f"{self.log_path}:\n{_tail(self.log_path)}")
            if self._healthy():
                self._ready = True
                log.info("answerer server ready at %s after %.1f s", self.base_url,
                         time.monotonic() - started)
                return
            if time.monotonic() > deadline:
                self.stop()
                raise AnswererError(
                    f"SGLang server at {self.base_url} was not healthy within "
                    f"{self.startup_timeout_s:g} s (answerer.sglang.startup_timeout_s). Last "
                    f"lines of {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(poll_s)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after the grace period."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        proc, self.proc, self._ready = self.proc, None, False
        if proc is None or proc.poll() is not None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("answerer server did not stop within %.0f s; killing it",
                        self.stop_grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Workers that ignored SIGTERM but outlived the leader still hold the GPU.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def _model_label(model: str) -> str:
    """A model name for the answerer's name: a folder's name, not its (movable) full path."""
    return Path(model).name if os.sep in model else model


class SGLangAnswerer:
    """``OpenAIAnswerer`` talking to a self-started SGLang server (or to ``openai.base_url``)."""

    def __init__(
        self,
        server_cfg: dict,
        ocfg: dict,
        *,
        idk_min_question_chars: int = 15,
        seed: int = 0,
        log_path: str | Path | None = None,
        launcher: Sequence[str] | None = None,
        images=None,
    ):
        model_path = server_cfg["model_path"]
        model = ocfg["model"] or model_path
        if not model:
            raise ValueError("answerer kind 'sglang' needs answerer.sglang.model_path (or, with "
                             "answerer.openai.base_url, answerer.openai.model)")
        key_env = ocfg["api_key_env"]
        configured_key = os.environ.get(key_env) or None
        self.server: SGLangServer | None = None
        base_url = ocfg["base_url"]
        if not base_url:
            self.server = SGLangServer(
                model_path, port=int(server_cfg["port"]), gpu=server_cfg["gpu"],
                mem_fraction_static=float(server_cfg["mem_fraction_static"]),
                api_key=configured_key, extra_args=server_cfg["extra_args"],
                startup_timeout_s=float(server_cfg["startup_timeout_s"]),
                log_path=log_path, launcher=launcher)
            self.server.start()
            base_url = self.server.base_url
        # An image model (LLaVA-OneVision, Qwen2-VL) is sent the target image instead of
        # the memory; SGLang serves both through the same chat-completions endpoint.
        client, extra, kind = OpenAIAnswerer, {}, "sglang"
        if images is not None:
            from llava_reid.answerer.visual import VisualOpenAIAnswerer

            client, extra, kind = VisualOpenAIAnswerer, {"images": images}, "sglang-visual"
        self.client = client(
            base_url, model, **extra,
            api_key=self.server.api_key if self.server else configured_key,
            api_key_env=key_env, **request_settings(ocfg),
            idk_min_question_chars=idk_min_question_chars, seed=seed,
            name=f"{kind}:{_model_label(model)}")
        self.name = self.client.name

    def answer(self, requests: Sequence[AnswerRequest]) -> list[str]:
        if self.server is not None:
            self.server.wait_ready()
        return self.client.answer(requests)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.server is not None:
                self.server.stop()
