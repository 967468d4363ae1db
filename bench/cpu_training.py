"""Embedded default on the CPU: the training-stage changes that cut its run time, each timed
against the way it was before, interleaved in one process (this machine's speed drifts by
tens of percent between runs, so only side-by-side ratios are meaningful).

Needs a finished embedded run (``snakemake --cores 2``; ``--run`` names its folder):

1. questioner SFT step, batches drawn by ``epoch_shard`` plain vs length-grouped
   (``questioner.sft.group_by_length``): padding and ms/step;
2. the retriever's per-epoch validation: images read from disk and resized every epoch (as
   before) vs decoded once (``SplitEvaluation``);
3. one retriever training step with 8-px vs 16-px patches (``retriever.tiny.patch_size``);
4. with ``--compile`` (instead of 1-3; writes ``cpu_training_compile.json``): one retriever
   training step eager vs ``torch.compile``d towers (Inductor's C++ backend), and what compiling
   costs up front.

    python3 bench/cpu_training.py --run results/embedded [--compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_results  # noqa: E402

from llava_reid.data.annotations import read_annotations  # noqa: E402
from llava_reid.data.transforms import RetrieverTransform  # noqa: E402
from llava_reid.training import epoch_shard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def interleaved(fns: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``rounds`` times."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def sft_steps(run: Path, cfg: dict, rounds: int) -> dict:
    from llava_reid.questioner.loading import ImageTokens, attach_lora, load_base
    from llava_reid.questioner.sft_data import load_examples
    from llava_reid.questioner.train import make_batch

    q = load_base(str(run / "models/questioner_tiny"), cfg["questioner"], torch.device("cpu"))
    tokens = ImageTokens.for_training(q, cfg["questioner"],
                                      str(run / "questioner/visual_tokens/train.safetensors"),
                                      None, None)
    attach_lora(q, cfg["questioner"])
    q.net.train()
    params = [p for p in q.net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    examples = load_examples(str(run / "prepare/conversations.parquet"))
    bs, seed = cfg["questioner"]["sft"]["batch_size"], cfg["seed"]
    lengths = [e.text_length() for e in examples]
    shards = {"plain": epoch_shard(len(examples), 1, seed, 1, 0, bs),
              "grouped": epoch_shard(len(examples), 1, seed, 1, 0, bs, lengths)}
    batches = {k: [make_batch(q, [examples[i] for i in b], 4, tokens) for b in s]
               for k, s in shards.items()}
    padding = {k: 1 - sum(int(b.attention_mask.sum()) for b in v)
               / sum(b.attention_mask.numel() for b in v) for k, v in batches.items()}
    cursor = {k: 0 for k in batches}

    def step(kind: str) -> None:
        b = batches[kind][cursor[kind] % len(batches[kind])]
        cursor[kind] += 1
        q.loss(b).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step("plain")
    step("grouped")
    t = interleaved({k: (lambda k=k: step(k)) for k in batches}, rounds)
    return {"batch": bs, "padding": padding, "seconds_per_step": t,
            "speedup": t["plain"] / t["grouped"]}


def retriever_validation(run: Path, rounds: int) -> dict:
    from llava_reid.retriever.encoder import RetrieverEncoder
    from llava_reid.retriever.train import SplitEvaluation

    rows = read_annotations(str(run / "data/annotations.parquet"), split="val")
    root = run / "data/synthetic"
    encoder = RetrieverEncoder.from_pretrained(run / "retriever/model", "cpu")
    preloaded = SplitEvaluation(rows, root, encoder.transform)

    def from_files() -> None:  # what every epoch did before: decode + resize + encode
        SplitEvaluation(rows, root, encoder.transform)(encoder, 256)

    t = interleaved({"from_files": from_files,
                     "preloaded": lambda: preloaded(encoder, 256)}, rounds)
    return {"images": len(rows), "seconds": t, "speedup": t["from_files"] / t["preloaded"]}


def retriever_steps(run: Path, cfg: dict, rounds: int, variants: dict | None = None) -> dict:
    """One training step of the embedded retriever per variant, interleaved. A variant is
    (patch size, compile the towers?); the default compares 8-px with 16-px patches."""
    from accelerate import Accelerator

    from llava_reid.retriever.init import build_tiny
    from llava_reid.retriever.model import QueryTokenizer, Retriever
    from llava_reid.retriever.train import PairDataset, _collate, train_step

    table = read_annotations(str(run / "data/annotations.parquet"), split="train")
    corpus = list(table.fine_grained_description) + list(table.initial_description)
    accelerator = Accelerator(cpu=True)
    variants = variants or {"patch8": (8, False), "patch16": (16, False)}
    steps = {}
    for name, (patch, compiled) in variants.items():
        rcfg = copy.deepcopy(cfg["retriever"])
        rcfg["tiny"]["patch_size"] = patch
        torch.manual_seed(0)
        clip, tokenizer = build_tiny(rcfg, corpus, cfg["seed"])
        model = Retriever(clip, num_classes=int(table.class_id.max()) + 1, with_mlm=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        tokenize = QueryTokenizer(tokenizer, rcfg["text_length"])
        data = PairDataset(table, run / "data/synthetic", RetrieverTransform(
            rcfg["image_height"], rcfg["image_width"], train=False), 0, rcfg["text_views"])
        bs = rcfg["batch_size"]
        batches = [_collate([data[i] for i in range(s, s + bs)]) for s in range(0, 8 * bs, bs)]
        if compiled:  # images have one shape; text batches are padded to their longest query
            model.clip.vision_model = torch.compile(model.clip.vision_model, dynamic=False)
            model.clip.text_model = torch.compile(model.clip.text_model, dynamic=True)
        steps[name] = (model, optimizer, tokenize, batches, [0])

    def step(name: str) -> None:
        model, optimizer, tokenize, batches, cursor = steps[name]
        b = batches[cursor[0] % len(batches)]
        cursor[0] += 1
        loss, _ = train_step(model, b, tokenize, {}, {"sdm": 1.0, "id": 1.0, "mlm": 0.0},
                             cfg["retriever"]["temperature"], accelerator, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    warmup = {}
    for name in steps:  # compiling happens over the first steps (one graph per text length)
        t = time.perf_counter()
        for _ in range(10):
            step(name)
        warmup[name] = time.perf_counter() - t
    t = interleaved({name: (lambda n=name: step(n)) for name in steps}, rounds)
    first, second = list(steps)
    return {"batch": cfg["retriever"]["batch_size"], "seconds_per_step": t,
            "first_10_steps_s": warmup, "speedup": t[first] / t[second]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(REPO / "results/embedded"))
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--compile", action="store_true",
                        help="only time a torch.compile'd retriever step against eager")
    args = parser.parse_args()
    run, cfg = Path(args.run), yaml.safe_load(Path(args.config).read_text())
    if args.compile:
        compile_only(run, cfg, args.rounds)
        return
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__,
               "sft": sft_steps(run, cfg, args.rounds),
               "retriever_validation": retriever_validation(run, max(3, args.rounds // 3)),
               "retriever_step": retriever_steps(run, cfg, args.rounds)}
    s, v, r = results["sft"], results["retriever_validation"], results["retriever_step"]
    print(f"SFT step ({s['batch']}/batch): plain {s['seconds_per_step']['plain']*1e3:.0f} ms "
          f"({100*s['padding']['plain']:.1f} % padding), grouped "
          f"{s['seconds_per_step']['grouped']*1e3:.0f} ms ({100*s['padding']['grouped']:.1f} %)"
          f": {s['speedup']:.2f}x")
    print(f"retriever validation ({v['images']} images): from files "
          f"{v['seconds']['from_files']:.2f} s, preloaded {v['seconds']['preloaded']:.2f} s: "
          f"{v['speedup']:.2f}x")
    print(f"retriever step ({r['batch']}/batch): 8-px patches "
          f"{r['seconds_per_step']['patch8']*1e3:.0f} ms, 16-px "
          f"{r['seconds_per_step']['patch16']*1e3:.0f} ms: {r['speedup']:.2f}x")
    print("wrote", write_results("cpu_training", results))


def compile_only(run: Path, cfg: dict, rounds: int) -> None:
    # A fresh Inductor cache, so the first steps pay what a cold DAG job would pay.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    c = retriever_steps(run, cfg, rounds, {"eager": (8, False), "compiled": (8, True)})
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__,
               "retriever_compile": c}
    print(f"retriever step ({c['batch']}/batch), torch.compile: eager "
          f"{c['seconds_per_step']['eager']*1e3:.0f} ms, compiled "
          f"{c['seconds_per_step']['compiled']*1e3:.0f} ms: {c['speedup']:.2f}x; first 10 "
          f"steps {c['first_10_steps_s']['eager']:.1f} s eager, "
          f"{c['first_10_steps_s']['compiled']:.1f} s compiled")
    print("wrote", write_results("cpu_training_compile", results))


if __name__ == "__main__":
    main()
