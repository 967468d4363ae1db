"""Retriever recipe sweep: train several variants of the embedded retriever side by side and
tabulate their validation and test metrics.

Each variant is a set of dotted overrides on top of a config file, e.g.
``retriever.epochs=60 retriever.text_views.initial=0.4``. Variants run as separate
``llava-reid`` processes (init + train), ``--parallel`` at a time, on the config's device.

    python3 bench/retriever_sweep.py --annotations results/embedded/data/annotations.parquet \
        --image-root results/embedded/data/synthetic \
        --variant base= --variant long=retriever.epochs=60
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from llava_reid.config import load_yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"override {item!r}: no key {key!r} in the config")
        node[leaf] = load_yaml(value)  # YAML 1.2 floats: 1e-3 is a number
    return cfg


def train_variant(name: str, cfg: dict, args, work: Path) -> dict:
    folder = work / name
    folder.mkdir(parents=True)
    config = json.dumps(cfg)
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(args.threads))
    cli = [sys.executable, "-m", "llava_reid.cli"]
    started = time.time()
    with open(folder / "log.txt", "w") as log:
        subprocess.run(cli + ["init-retriever", "--config", config, "--annotations",
                              args.annotations, "--out", str(folder / "init")],
                       check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        subprocess.run(cli + ["train-retriever", "--config", config, "--annotations",
                              args.annotations, "--image-root", args.image_root,
                              "--init", str(folder / "init"), "--out", str(folder / "model"),
                              "--metrics", str(folder / "metrics.json"),
                              "--checkpoints", str(folder / "ckpt")],
                       check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    metrics = json.loads((folder / "metrics.json").read_text())
    row = {"variant": name, "best_epoch": metrics["best_epoch"],
           "minutes": round((time.time() - started) / 60, 2)}
    for split in ("val", "test"):
        for key in ("f-R1", "i-R1", "i-R10"):
            row[f"{split} {key}"] = metrics[split][key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=override[,override...] (empty for the config as is)")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per variant")
    parser.add_argument("--device", default=None, help="override the config's device")
    parser.add_argument("--name", default="retriever_sweep", help="results file name")
    args = parser.parse_args()

    base = load_yaml(Path(args.config).read_text())
    if args.device:
        base["device"] = args.device
    variants = {}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        variants[name] = apply_overrides(base, [o for o in rest.split(",") if o])

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.parallel) as pool:
        futures = {n: pool.submit(train_variant, n, c, args, Path(tmp)) for n, c in
                   variants.items()}
        rows = []
        for name, fut in futures.items():
            try:
                rows.append(fut.result())
            except subprocess.CalledProcessError:
                print(f"{name}: failed; log:\n" + (Path(tmp) / name / "log.txt").read_text()[-3000:])
    columns = list(rows[0]) if rows else []
    print_table(args.name, rows, columns)
    write_results(args.name, {"device": base["device"], "variants": args.variant, "rows": rows})


if __name__ == "__main__":
    main()
