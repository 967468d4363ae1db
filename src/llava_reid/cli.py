"""``llava-reid``: one subcommand per workflow stage.

Every rule in rules/*.smk calls exactly one subcommand. Each takes ``--config`` (inline JSON of
the sections the stage reads, as the rules pass it, or a config file path) and explicit
input/output paths, so a stage can be run by hand outside Snakemake.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
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
    "prepare-data": (
        "llava_reid.interact.prepare_data",
        "run",
        "Look-ahead oracle plan and questioner SFT conversations (Parquet).",
        [
            ("--annotations", {"required": True}),
            ("--gallery", {"required": True, "help": "features/train_gallery.parquet"}),
            ("--retriever", {"required": True, "help": "trained retriever folder"}),
            ("--oracle-plan", {"required": True, "help": "prepare/oracle_plan.parquet"}),
            ("--conversations", {"required": True, "help": "prepare/conversations.parquet"}),
        ],
    ),
    "build-tiny-questioner": (
        "llava_reid.questioner.factory",
        "run",
        "Build the tiny LLaVA-OneVision + BPE tokenizer of the embedded default.",
        [
            ("--annotations", {"required": True}),
            ("--out", {"required": True, "help": "model folder (save_pretrained)"}),
        ],
    ),
    "cache-visual-tokens": (
        "llava_reid.questioner.visual_cache",
        "run",
        "Encode one split's images to the questioner's visual tokens, once.",
        [
            ("--annotations", {"required": True}),
            ("--image-root", {"required": True}),
            ("--model", {"required": True, "help": "LLaVA-OneVision folder"}),
            ("--adapter", {"default": None, "help": "adapter whose trained projector to use"}),
            ("--split", {"required": True}),
            ("--out", {"required": True, "help": "visual tokens (.safetensors)"}),
        ],
    ),
    "train-questioner": (
        "llava_reid.questioner.train",
        "run",
        "LoRA SFT of the questioner on the look-ahead conversations.",
        [
            ("--model", {"required": True, "help": "base LLaVA-OneVision folder"}),
            ("--conversations", {"required": True}),
            ("--visual-tokens", {"required": True, "help": "train split visual-token cache"}),
            ("--annotations", {"required": True}),
            ("--image-root", {"required": True}),
            ("--out", {"required": True, "help": "adapter folder"}),
            ("--metrics", {"required": True}),
            ("--checkpoints", {"required": True}),
        ],
    ),
    "warmup-selector": (
        "llava_reid.selector.warmup",
        "run",
        "Warm the selector up to imitate plain top-k on the conversations' pools.",
        [
            ("--conversations", {"required": True}),
            ("--gallery", {"required": True, "help": "features/train_gallery.parquet"}),
            ("--retriever", {"required": True}),
            ("--out", {"required": True, "help": "selector/warmup.safetensors"}),
            ("--metrics", {"required": True}),
        ],
    ),
    "train-joint": (
        "llava_reid.selector.joint",
        "run",
        "Train the selector and the questioner adapter together (Gumbel top-k, straight-through).",
        [
            ("--model", {"required": True, "help": "base LLaVA-OneVision folder"}),
            ("--adapter", {"required": True, "help": "SFT adapter to continue"}),
            ("--selector", {"required": True, "help": "warmed-up selector"}),
            ("--conversations", {"required": True}),
            ("--gallery", {"required": True, "help": "features/train_gallery.parquet"}),
            ("--retriever", {"required": True}),
            ("--visual-tokens", {"required": True}),
            ("--annotations", {"required": True}),
            ("--image-root", {"required": True}),
            ("--out-adapter", {"required": True}),
            ("--out-selector", {"required": True}),
            ("--metrics", {"required": True}),
            ("--checkpoints", {"required": True}),
        ],
    ),
    "evaluate": (
        "llava_reid.interact.evaluate",
        "run",
        "Interactive dialogues of one chunk of the test queries, for one method.",
        [
            ("--method", {"required": True, "help": "initial|random|oracle|questioner|selector"}),
            ("--chunk", {"required": True, "type": int, "help": "chunk index i (0-based)"}),
            ("--chunks", {"required": True, "type": int, "help": "number of chunks n"}),
            ("--annotations", {"required": True}),
            ("--gallery", {"required": True, "help": "features/test_gallery.parquet"}),
            ("--queries", {"required": True, "help": "features/test_queries.parquet"}),
            ("--retriever", {"required": True}),
            ("--questioner", {"default": None, "help": "base LLaVA-OneVision folder"}),
            ("--adapter", {"default": None, "help": "questioner LoRA adapter"}),
            ("--visual-tokens", {"default": None, "help": "test split visual-token cache"}),
            ("--selector", {"default": None, "help": "selector .safetensors"}),
            ("--answers-cache", {"required": True, "help": "Parquet answer cache"}),
            ("--image-root", {"default": None,
                              "help": "folder of the target images (an answerer that sees them)"}),
            ("--out", {"required": True, "help": "eval/{method}/chunks/{i}-of-{n}.parquet"}),
        ],
    ),
    "merge-eval": (
        "llava_reid.interact.merge",
        "run",
        "Join a method's evaluation chunks by query id; per-round metrics and BRI.",
        [
            ("--method", {"required": True}),
            ("--chunks", {"required": True, "nargs": "+", "help": "chunk Parquet files"}),
            ("--gallery", {"required": True}),
            ("--queries", {"required": True}),
            ("--out", {"required": True, "help": "eval/{method}/dialogues.parquet"}),
            ("--metrics", {"required": True, "help": "eval/{method}/metrics.json"}),
        ],
    ),
    "export-similarity": (
        "llava_reid.interact.fusion",
        "export",
        "Our retriever's score of every query against every gallery image (auxiliary-similarity "
        "Parquet: query_id, image_idx, score).",
        [
            ("--gallery", {"required": True, "help": "features/test_gallery.parquet"}),
            ("--queries", {"required": True, "help": "features/test_queries.parquet"}),
            ("--out", {"required": True, "help": "Parquet file"}),
        ],
    ),
    "plots": (
        "llava_reid.report.plots",
        "run",
        "Recall-vs-round and BRI plots and the per-round metric table of every method.",
        [
            ("--metrics", {"required": True, "nargs": "+", "help": "eval/{method}/metrics.json"}),
            ("--out-dir", {"required": True, "help": "folder for the figures and tables"}),
        ],
    ),
    "ranked-lists": (
        "llava_reid.report.ranked_lists",
        "run",
        "Pictures of a few dialogues: query, question, answer and the top-k per round.",
        [
            ("--dialogues", {"required": True, "help": "eval/{method}/dialogues.parquet"}),
            ("--gallery", {"required": True, "help": "features/test_gallery.parquet"}),
            ("--image-root", {"required": True}),
            ("--out", {"required": True, "help": "PNG file"}),
        ],
    ),
    "import-retriever": (
        "llava_reid.retriever.importing",
        "run",
        "Import published retriever weights (IRRA's checkpoint, or an earlier run's model).",
        [
            ("--from", {"dest": "source", "required": True, "choices": ["irra", "ours"]}),
            ("path", {"help": "IRRA checkpoint.pth / .safetensors, or a retriever/model folder"}),
            ("--out", {"required": True, "help": "retriever model folder"}),
            ("--tokenizer", {"default": None, "help": "CLIP tokenizer folder (irra; default: "
                             "retriever.checkpoint.tokenizer, then retriever.pretrained)"}),
            ("--metrics", {"default": None, "help": "metrics.json (val/test with --annotations)"}),
            ("--annotations", {"default": None, "help": "annotations.parquet to evaluate on"}),
            ("--image-root", {"default": None}),
        ],
    ),
    "import-questioner": (
        "llava_reid.questioner.importing",
        "run",
        "Import a published questioner LoRA adapter (the original's, or an earlier run's).",
        [
            ("--from", {"dest": "source", "required": True, "choices": ["llava-reid", "ours"]}),
            ("path", {"help": "adapter folder (adapter_config.json + adapter_model.*)"}),
            ("--out", {"required": True, "help": "adapter folder"}),
            ("--model", {"default": None, "help": "base LLaVA-OneVision folder to check against"}),
            ("--metrics", {"default": None, "help": "metrics.json (what was imported)"}),
        ],
    ),
    "import-selector": (
        "llava_reid.selector.importing",
        "run",
        "Import a published selector (the original's selector.pth, or an earlier run's).",
        [
            ("--from", {"dest": "source", "required": True, "choices": ["llava-reid", "ours"]}),
            ("path", {"help": "selector.pth (or its folder), or a selector .safetensors"}),
            ("--out", {"required": True, "help": "selector .safetensors"}),
            ("--retriever", {"default": None, "help": "retriever folder (feature size check)"}),
            ("--adapter", {"default": None, "help": "questioner adapter published with it"}),
            ("--out-adapter", {"default": None, "help": "where to copy --adapter (joint/adapter)"}),
            ("--metrics", {"default": None}),
        ],
    ),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-reid", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes (one per GPU); > 1 relaunches the stage under torchrun --standalone",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, (_, _, help_text, args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Imports run by hand need no config (their settings have defaults).
        optional = name.startswith("import-")
        p.add_argument("--config", required=not optional, default="{}" if optional else None,
                       help="inline JSON or a config YAML path")
        for flag, kwargs in args:
            p.add_argument(flag, **kwargs)
    return parser


def _resolve(module: str, function: str) -> Callable[..., object]:
    return getattr(importlib.import_module(module), function)


def _relaunch_distributed(nproc: int, argv: list[str]) -> int:
    """Run this same command as ``nproc`` torchrun workers on this node (one per GPU)."""
    rest, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(argv[i])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "llava_reid.cli", *rest]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch_distributed(args.nproc, argv)
    setup_logging(args.log_level)
    module, function, _, _ = COMMANDS[args.command]
    cfg = load_config(args.config)
    kwargs = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "log_level", "nproc")
    }
    _resolve(module, function)(cfg, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
