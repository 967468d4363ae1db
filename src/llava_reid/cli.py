"""``llava-reid``: one subcommand per workflow stage.

Every rule in rules/*.smk calls exactly one subcommand. Each takes ``--config`` (inline JSON of
the sections the stage reads, as the rules pass it, or a config file path) and explicit
input/output paths, so a stage can be run by hand outside Snakemake.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from llava_reid.config import load_config
from llava_reid.runtime import setup_logging

# subcommand -> (module, function, help, [(flag, kwargs), ...])
Arg = tuple[str, dict]
COMMANDS: dict[str, tuple[str, str, str, list[Arg]]] = {
    "synthesize": (
        "llava_reid.data.synthetic",
        "run",
        "Render the synthetic pedestrian dataset (Interactive-PEDES annotation format).",
        [("--out-dir", {"required": True, "help": "folder for annotations.json and images/"})],
    ),
    "load-annotations": (
        "llava_reid.data.annotations",
        "run",
        "Validate an Interactive-PEDES annotation JSON and write data/annotations.parquet.",
        [
            ("--annotations", {"required": True, "help": "annotation JSON"}),
            ("--image-root", {"required": True, "help": "folder file_path is relative to"}),
            ("--out", {"required": True, "help": "annotations.parquet"}),
        ],
    ),
    "init-retriever": (
        "llava_reid.retriever.init",
        "run",
        "Build the retriever's starting point (tiny CLIP + BPE, or adapt a local CLIP).",
        [
            ("--annotations", {"required": True, "help": "annotations.parquet"}),
            ("--out", {"required": True, "help": "model folder (save_pretrained)"}),
        ],
    ),
    "train-retriever": (
        "llava_reid.retriever.train",
        "run",
        "Train the IRRA-style retriever (SDM + ID + MLM) with checkpoints and resume.",
        [
            ("--annotations", {"required": True}),
            ("--image-root", {"required": True}),
            ("--init", {"required": True, "help": "folder written by init-retriever"}),
            ("--out", {"required": True, "help": "final model folder"}),
            ("--metrics", {"required": True, "help": "metrics.json"}),
            ("--checkpoints", {"required": True, "help": "folder for per-epoch checkpoints"}),
        ],
    ),
    "cache-features": (
        "llava_reid.retriever.features",
        "run",
        "Encode one split's gallery images and queries to Parquet.",
        [
            ("--annotations", {"required": True}),
            ("--image-root", {"required": True}),
            ("--model", {"required": True}),
            ("--split", {"required": True}),
            ("--gallery-out", {"required": True}),
            ("--queries-out", {"required": True}),
        ],
    ),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-reid", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, (_, _, help_text, args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=True, help="inline JSON or a config YAML path")
        for flag, kwargs in args:
            p.add_argument(flag, **kwargs)
    return parser


def _resolve(module: str, function: str) -> Callable[..., object]:
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    setup_logging(args.log_level)
    module, function, _, _ = COMMANDS[args.command]
    cfg = load_config(args.config)
    kwargs = {
        k: v for k, v in vars(args).items() if k not in ("command", "config", "log_level")
    }
    _resolve(module, function)(cfg, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
