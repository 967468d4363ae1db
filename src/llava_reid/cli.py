"""llava-reid: one subcommand per workflow stage.

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
import traceback
from collections.abc import Callable

from llava_reid import __version__
from llava_reid.config import load_config
from llava_reid.runtime import setup_logging
from llava_reid.stage_views import METHODS, STAGE_KEYS, StageConfig, stage_keys
from llava_reid.usage import StageUsage

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
            ("--fold", {"default": None, "help": "K/N: leave out the training identities of "
                        "fold K of N (a cross-fitting retriever for prepare-data)"}),
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
            ("--fold", {"default": None, "help": "K/N: only the images of identities in fold K"}),
        ],
    ),
    "prepare-data": (
        "llava_reid.dialogue.prepare_data",
        "run",
        "Look-ahead oracle plan and questioner SFT conversations (Parquet).",
        [
            ("--annotations", {"required": True}),
            ("--gallery", {"required": True, "help": "features/train_gallery.parquet"}),
            ("--retriever", {"required": True, "help": "trained retriever folder"}),
            ("--oracle-plan", {"required": True, "help": "prepare/oracle_plan.parquet"}),
            ("--conversations", {"required": True, "help": "prepare/conversations.parquet"}),
            ("--label-retrievers", {"nargs": "*", "default": [],
                                    "help": "fold retrievers (prepare.cross_fit), in fold order"}),
            ("--label-galleries", {"nargs": "*", "default": [],
                                   "help": "their held-out training features, in fold order"}),
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
        "llava_reid.dialogue.evaluate",
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
        "llava_reid.dialogue.merge",
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
        "llava_reid.dialogue.fusion",
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
            ("--dialogues", {"required": True, "nargs": "+",
                             "help": "eval/{method}/dialogues.parquet, in the order of --metrics"}),
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
            ("--out", {"required": True, "help": "JPEG file"}),
        ],
    ),
    "training-curves": (
        "llava_reid.report.training_curves",
        "run",
        "Loss and validation curves of every training stage, from their metrics histories.",
        [
            ("--retriever", {"help": "retriever/metrics.json"}),
            ("--questioner", {"help": "questioner/metrics.json"}),
            ("--warmup", {"help": "selector/warmup_metrics.json"}),
            ("--joint", {"help": "joint/metrics.json"}),
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
            ("--image-size", {"default": None, "help": "HxW input it was trained at (irra; "
                              "default: retriever.image_height/width, else 384x128)"}),
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
            ("--adapter", {"default": None,
                           "help": "questioner adapter to use when none is published beside it"}),
            ("--out-adapter", {"default": None, "help": "joint adapter folder to write"}),
            ("--model", {"default": None, "help": "base LLaVA-OneVision folder to check against"}),
            ("--metrics", {"default": None}),
        ],
    ),
    "demo": (
        "llava_reid.witness.commands",
        "demo",
        "Witness page: search a trained run's gallery by answering its questions (browser).",
        [
            ("--run", {"default": None, "help": "run folder (default: {results}/{run})"}),
            ("--method", {"default": None, "help": "selector|questioner (default: selector)"}),
            ("--image-root", {"default": None, "help": "folder gallery file paths are under"}),
            ("--host", {"default": "127.0.0.1", "help": "0.0.0.0 exposes the page"}),
            ("--port", {"default": 7860, "type": int}),
            ("--top-k", {"default": 10, "type": int, "help": "ranked images shown"}),
            ("--sessions", {"default": None, "help": "folder (default: {run}/witness/sessions)"}),
            ("--token-env", {"default": "LLAVA_REID_DEMO_TOKEN",
                             "help": "environment variable holding an access token"}),
            ("--check", {"action": "store_true", "help": "only check the run, print the command"}),
        ],
    ),
    "chat": (
        "llava_reid.witness.commands",
        "chat",
        "Witness loop in the terminal: ranked ids and paths, a question, your answer (stdin).",
        [
            ("--run", {"default": None, "help": "run folder (default: {results}/{run})"}),
            ("--method", {"default": None, "help": "selector|questioner (default: selector)"}),
            ("--image-root", {"default": None, "help": "folder gallery file paths are under"}),
            ("--query", {"default": None, "type": int, "help": "replay this test query id"}),
            ("--top-k", {"default": 10, "type": int, "help": "ranked images shown"}),
            ("--sessions", {"default": None, "help": "folder (default: {run}/witness/sessions)"}),
        ],
    ),
}

# Interactive commands on a finished run: --config defaults to the repository's config file.
INTERACTIVE = ("demo", "chat")


# Help and closed sets of the flags many stages share (a stage's own entry above wins).
FLAG_HELP = {
    "--annotations": "validated annotations (data/annotations.parquet)",
    "--image-root": "folder the annotations' file_path are relative to",
    "--model": "model folder (save_pretrained)",
    "--retriever": "trained retriever folder (retriever/model)",
    "--split": "dataset split",
    "--gallery": "gallery features Parquet (features/{split}_gallery.parquet)",
    "--queries": "query features Parquet (features/{split}_queries.parquet)",
    "--gallery-out": "gallery features Parquet to write",
    "--queries-out": "query features Parquet to write",
    "--conversations": "SFT conversations (prepare/conversations.parquet)",
    "--visual-tokens": "visual-token cache (.safetensors)",
    "--metrics": "metrics JSON to write",
    "--checkpoints": "folder for resumable checkpoints",
    "--method": "what asks the questions",
    "--out": "output path",
}
FLAG_CHOICES = {
    "--split": ("train", "val", "test"),
    "--method": METHODS,
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-reid", description=__doc__.splitlines()[0],
        epilog="Expected failures (bad config or input, a missing or corrupt file, an "
               "unreachable answerer, a full disk) print one line and exit 1; --verbose adds "
               "the traceback.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default INFO)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the traceback of an expected failure, not just its line")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes (one per GPU); > 1 relaunches the stage under torchrun --standalone",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE",
                                help="the workflow stage to run (STAGE --help: its flags)")
    for name, (_, _, help_text, args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        interactive = name in INTERACTIVE
        # Imports run by hand need no config (their settings have defaults).
        importing = name.startswith("import-")
        p.add_argument("--config", required=not (interactive or importing),
                       default="{}" if importing else None,
                       help="inline JSON or a config YAML path" + (
                           " (default: the run's witness/config.yaml, else config.yaml)"
                           if interactive else ""))
        for flag, kwargs in args:
            extra = {}
            if "help" not in kwargs:
                extra["help"] = FLAG_HELP.get(flag, flag.lstrip("-").replace("-", " "))
            if flag in FLAG_CHOICES and "choices" not in kwargs:
                extra["choices"] = FLAG_CHOICES[flag]
            p.add_argument(flag, **kwargs, **extra)
    _add_install_profile(sub)
    return parser


def _add_install_profile(sub) -> None:
    """Not a stage: a one-time set-up step (no --config), see snakemake_profile.py."""
    text = ("Link profiles/slurm into Snakemake's user config folder, so that "
            "`snakemake --profile slurm` works from any directory (never replaces a profile).")
    p = sub.add_parser("install-profile", help=text, description=text)
    p.add_argument("--name", default="slurm", help="profile name to install under")
    p.add_argument("--copy", action="store_true",
                   help="copy instead of linking (a copy does not follow edits or git pulls)")
    p.add_argument("--source", default=None, help="profile folder (default: profiles/slurm)")
    p.add_argument("--dest", default=None,
                   help="folder to install into (default: Snakemake's user config folder)")


def _install_profile(args) -> int:
    from pathlib import Path

    from llava_reid.snakemake_profile import ProfileInstallError, install_profile

    try:
        done = install_profile(Path(args.source) if args.source else None,
                               Path(args.dest) if args.dest else None, args.name, args.copy)
    except ProfileInstallError as err:
        print(f"llava-reid install-profile: {err}", file=sys.stderr)
        return 1
    print(done.message())
    return 0


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
    if args.command == "install-profile":
        return _install_profile(args)
    if not sys.stderr.isatty():
        # Weight-loading progress bars would write carriage-return noise into the log files.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch_distributed(args.nproc, argv)
    setup_logging(args.log_level)
    module, function, _, _ = COMMANDS[args.command]
    if args.command in INTERACTIVE and args.config is None:
        from llava_reid.witness.run_files import default_config

        args.config = default_config(args.run)
    kwargs = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "log_level", "nproc", "verbose")
    }
    try:
        method = getattr(args, "method", None)
        if args.config.lstrip().startswith("{") and args.command in STAGE_KEYS:
            # A rule's view: the schema's defaults fill only the keys it passes, and reading a
            # key the rule does not pass is an error, not a silent miss.
            cfg = load_config(args.config, stage_keys(args.command, method))
            cfg = StageConfig.wrap(cfg, args.command, method)
        else:
            cfg = load_config(args.config)
        usage = StageUsage(args.command)
        _resolve(module, function)(cfg, **kwargs)
        usage.report()
    except KeyboardInterrupt:
        print(f"llava-reid {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from llava_reid.errors import expected_message

        message = expected_message(exc)
        if message is None:
            raise  # a bug: keep the traceback
        if args.verbose:
            traceback.print_exc()
        print(f"llava-reid {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
