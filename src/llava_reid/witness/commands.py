"""The ``demo`` (web page) and ``chat`` (terminal) subcommands on a trained run."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

from llava_reid.witness.run_files import RunFiles

log = logging.getLogger(__name__)


def _run_dir(cfg: dict[str, Any], run: str | None) -> Path:
    if run:
        return Path(run)
    if "results" not in cfg or "run" not in cfg:
        raise ValueError("--run is needed (the config names no results/run)")
    return Path(cfg["results"]) / cfg["run"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def start_command(config: str, run: Path) -> str:
    flags = "" if config == "config.yaml" else f" --config {config}"
    return f"llava-reid demo{flags} --run {run}"


def demo(cfg: dict[str, Any], run: str | None = None, method: str | None = None,
         image_root: str | None = None, host: str = "127.0.0.1", port: int = 7860,
         top_k: int = 10, sessions: str | None = None,
         token_env: str = "LLAVA_REID_DEMO_TOKEN", check: bool = False,
         config_path: str = "config.yaml") -> None:
    """Serve the witness page on ``run`` (``check``: only say whether the run is ready and
    how to start the page)."""
    from llava_reid.witness.server import (
        WitnessApp,
        serve,
        sessions_dir_for,
        token_from_env,
    )

    run_dir = _run_dir(cfg, run)
    files = RunFiles.locate(run_dir, cfg, method, image_root)
    if check:
        files.check()
        print(f"The witness demo is ready on {run_dir} ({files.method}). Start the page with:\n"
              f"  {start_command(config_path, run_dir)}\n"
              "then open http://127.0.0.1:7860/ (or `llava-reid chat` with the same flags in a "
              "terminal).", flush=True)
        return
    from llava_reid.witness.models import WitnessModels

    token = token_from_env(token_env)
    if not _is_loopback(host) and token is None:
        log.warning("serving on %s without an access token: anyone who can reach this port "
                    "can use the page (set %s to require one)", host, token_env)
    models = WitnessModels.load(cfg, files)
    app = WitnessApp(models, sessions_dir_for(run_dir, sessions), top_k, token)

    def ready(url: str) -> None:
        hint = "?token=<the token>" if token else ""
        print(f"witness page: {url}{hint}  (Ctrl-C to stop; sessions saved in "
              f"{app.sessions_dir})", flush=True)

    serve(app, host, port, ready)


def chat(cfg: dict[str, Any], run: str | None = None, method: str | None = None,
         image_root: str | None = None, query: int | None = None, top_k: int = 10,
         sessions: str | None = None, config_path: str = "config.yaml") -> None:
    """The witness loop on standard input/output."""
    from llava_reid.witness.chat import run_loop
    from llava_reid.witness.models import WitnessModels
    from llava_reid.witness.server import sessions_dir_for
    from llava_reid.witness.session import WitnessSession

    run_dir = _run_dir(cfg, run)
    models = WitnessModels.load(cfg, RunFiles.locate(run_dir, cfg, method, image_root))
    out_dir = sessions_dir_for(run_dir, sessions)

    def start(description: str | None) -> WitnessSession:
        return WitnessSession.start(models, description, query, out_dir, top_k)

    run_loop(start, sys.stdin, sys.stdout, replay=query is not None)
