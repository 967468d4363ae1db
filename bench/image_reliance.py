"""Does the trained questioner read its candidate images? (What the selector can act on.)

The selector's only lever is which candidate images the questioner sees, and its only training
signal is the questioner's loss on the look-ahead question given those images. If the loss
hardly changes when the images change, the selector has nothing to learn and nothing to gain.

On the questioner's own held-out SFT examples (``split_holdout`` with the run's seed), this
measures the loss (nats per question token) of each adapter with

- ``top-k``: the round's top candidates, as in training and plain top-k evaluation;
- ``top-1 + pool``: the top-1 kept and the others drawn from pool ranks 2-20 (what a selector
  could pick instead);
- ``other query``: the candidates of another held-out example (a seeded derangement): images
  that have nothing to do with the description;
- ``other description`` (for scale): the top-k images kept, the first description taken from
  another held-out example.

Usage (after a run; the config files the run used, later ones override earlier ones):
``python bench/image_reliance.py results/embedded --config config.yaml``
``python bench/image_reliance.py results/embedded-heldout --config config.yaml
workflow/presets/embedded-heldout.yaml``
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from llava_reid.config import load_config, load_yaml
from llava_reid.questioner.loading import ImageTokens, attach_lora, load_base
from llava_reid.questioner.sft_data import Example, load_examples, split_holdout
from llava_reid.questioner.train import SFTConfig, make_batch
from llava_reid.stage_views import typed_view

POOL_DEPTH = 20


def derangement(n: int, rng: np.random.Generator) -> list[int]:
    """For each index, another index (n > 1): a seeded cycle through a permutation."""
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner.tolist()


def variants(held: list[Example], k: int, seed: int
             ) -> dict[str, tuple[list[Example], list[list[int]]]]:
    """Name -> (examples, candidate image ids of each)."""
    rng = np.random.default_rng(seed)
    top_k = [e.top_k(k) for e in held]
    pool = []
    for e in held:
        deeper = list(e.pool[1:POOL_DEPTH])
        picked = rng.choice(len(deeper), size=min(k - 1, len(deeper)), replace=False)
        pool.append([e.pool[0], *(deeper[i] for i in sorted(picked))])
    other = derangement(len(held), rng)
    swapped = [replace(e, prompt_args=(e.prompt_args[0], held[j].prompt_args[1],
                                       *e.prompt_args[2:]))
               for e, j in zip(held, other, strict=True)]
    return {"top-k": (held, top_k), "top-1 + pool": (held, pool),
            "other query": (held, [top_k[j] for j in other]),
            "other description": (swapped, top_k)}


def merged_config(paths: list[str]) -> dict:
    """The config files merged as Snakemake merges ``--configfile``s (nested keys update)."""
    def merge(base: dict, extra: dict) -> dict:
        out = dict(base)
        for key, value in extra.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both else value
        return out

    cfg: dict = {}
    for path in paths:
        cfg = merge(cfg, load_yaml(Path(path).read_text(encoding="utf-8")) or {})
    return load_config(json.dumps(cfg))


@torch.no_grad()
def mean_loss(q, held: list[Example], image_ids: list[list[int]], tokens: ImageTokens,
              batch_size: int) -> float:
    total, count = 0.0, 0
    for s in range(0, len(held), batch_size):
        batch_examples, ids = held[s:s + batch_size], image_ids[s:s + batch_size]
        batch = make_batch(q, batch_examples, len(ids[0]), tokens, ids)
        total += float(q.loss(batch)) * len(batch_examples)
        count += len(batch_examples)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run's results folder, e.g. results/embedded")
    parser.add_argument("--config", nargs="+", default=["config.yaml"],
                        help="the config file(s) the run used")
    parser.add_argument("--max-examples", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)

    settings = typed_view(SFTConfig, merged_config(args.config))
    qcfg = dict(settings.questioner)
    run = args.run
    _, held = split_holdout(load_examples(str(run / "prepare" / "conversations.parquet")),
                            settings.sft.holdout, settings.seed)
    held = held[:args.max_examples]
    sets = variants(held, settings.num_candidates, settings.seed)
    pretrained = qcfg.get("pretrained") or str(run / "models" / "questioner_tiny")
    print(f"{len(held)} held-out examples, {settings.num_candidates} candidates each")
    print("adapter\t" + "\t".join(sets))
    for name in ("questioner", "joint"):
        adapter = run / name / "adapter"
        if not adapter.exists():
            continue
        q = load_base(pretrained, qcfg, torch.device("cpu"))
        attach_lora(q, qcfg, adapter=str(adapter))
        q.net.eval()
        tokens = ImageTokens.for_training(
            q, qcfg, str(run / "questioner" / "visual_tokens" / "train.safetensors"),
            str(run / "data" / "annotations.parquet"), str(run / "data" / "synthetic"))
        losses = [mean_loss(q, examples, ids, tokens, settings.sft.batch_size)
                  for examples, ids in sets.values()]
        print(f"{name}\t" + "\t".join(f"{v:.4f}" for v in losses))


if __name__ == "__main__":
    main()
