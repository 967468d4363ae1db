"""The ``demo`` (web page) and ``chat`` (terminal) subcommands on a trained run."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

from llava_reid.witness.run_files import RUN_CONFIG, RunFiles

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


def save_run_config(cfg: dict[str, Any], run: Path) -> Path:
    """Keep the workflow's whole config (presets merged) in the run, for the page to load."""
    import yaml

    from llava_reid.artifacts import atomic_path

    path = run / RUN_CONFIG
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def demo(cfg: dict[str, Any], run: str | None = None, method: str | None = None,
         image_root: str | None = None, host: str = "127.0.0.1", port: int = 7860,
         top_k: int = 10, sessions: str | None = None,
         token_env: str = "LLAVA_REID_DEMO_TOKEN", check: bool = False) -> None:
    """Serve the witness page on ``run`` (``check``: check the run is ready, save the config
    in it and print how to start the page)."""
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
        save_run_config(cfg, run_dir)
        print(f"The witness demo is ready on {run_dir} ({files.method}). Start the page with:\n"
              f"  llava-reid demo --run {run_dir}\n"
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
         sessions: str | None = None) -> None:
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
