"""What a stage's log file looks like with tqdm progress vs our step log lines.

Issue 19 item 9 asks whether ``tqdm`` should replace the hand-written progress logs (the
training loop's ``epoch e/E step s/S (g/G) loss ... lr ...; elapsed, ETA``, the per-round lines
of prepare_data and evaluate). A Snakemake job's stderr is a log file, not a TTY. This script
runs the same loop (``--steps`` steps of ``--step-ms`` each, with the loss logged every
``--log-every`` steps, as the training loop does) in a child process whose stderr is a file,
once per way of reporting progress, and counts what lands in the file:

- ``ours``: ``logging`` lines every ``log_every`` steps (the training loop's format);
- ``tqdm``: ``tqdm(file=sys.stderr, mininterval=1)`` plus the same loss lines through
  ``tqdm.contrib.logging.logging_redirect_tqdm`` (tqdm's documented way to mix bars and logs);
- ``tqdm-postfix``: ``tqdm(..., mininterval=1)`` with the loss in ``set_postfix``, no log lines.

    PYTHONPATH=src python bench/progress_logs.py --steps 3000 --step-ms 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import logging, math, sys, time
mode, steps, step_s, log_every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("llava_reid.training")
started = time.time()
loss = lambda s: 2.0 * math.exp(-s / steps)
if mode == "ours":
    for s in range(steps):
        time.sleep(step_s)
        if s % log_every == 0:
            el = time.time() - started
            log.info("retriever: epoch 1/1 step %d/%d (%d/%d) loss %.4f lr %.2e; %.0fs elapsed, "
                     "ETA %.0fs", s + 1, steps, s + 1, steps, loss(s), 1e-4, el,
                     el / (s + 1) * (steps - s - 1))
elif mode == "tqdm":
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm():
        for s in tqdm(range(steps), desc="retriever epoch 1/1", file=sys.stderr, mininterval=1):
            time.sleep(step_s)
            if s % log_every == 0:
                log.info("retriever: step %d loss %.4f lr %.2e", s + 1, loss(s), 1e-4)
elif mode == "tqdm-postfix":
    from tqdm import tqdm
    bar = tqdm(range(steps), desc="retriever epoch 1/1", file=sys.stderr, mininterval=1)
    for s in bar:
        time.sleep(step_s)
        if s % log_every == 0:
            bar.set_postfix(loss=f"{loss(s):.4f}", lr=f"{1e-4:.2e}", refresh=False)
"""


def run(mode: str, args) -> dict:
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", CHILD, mode, str(args.steps),
                        str(args.step_ms / 1000), str(args.log_every)], stderr=err, check=True)
        wall = time.perf_counter() - t0
        err.seek(0)
        data = err.read()
    lines = data.split(b"\n")
    # What `tail -n 1 log` shows: the last line, with everything before its last \r drawn over.
    last = next(line for line in reversed(lines) if line.strip())
    return {"mode": mode, "bytes": len(data), "newlines": data.count(b"\n"),
            "carriage_returns": data.count(b"\r"),
            "lines_with_loss": sum(b"loss" in line for line in lines),
            "longest_line_bytes": max(len(line) for line in lines),
            "wall_s": round(wall, 2),
            "tail_n1": last.decode(errors="replace")[-160:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    rows = [run(mode, args) for mode in ("ours", "tqdm", "tqdm-postfix")]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1)
                                  + "\n")


if __name__ == "__main__":
    main()
