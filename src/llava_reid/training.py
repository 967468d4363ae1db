"""Pieces shared by the training stages: seeds, schedules, sharding and resumable checkpoints.

Every random draw of a training stage derives from (config seed, epoch, step, rank), so a run
resumed from a checkpoint takes the same path as one that was never interrupted, and the same
config gives the same numbers on CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llava_reid.artifacts import atomic_dir

log = logging.getLogger(__name__)


def make_accelerator(device_pref: str, grad_accum: int, seed: int):
    """accelerate for a training stage: bf16 on CUDA, fp32 (and deterministic kernels) on CPU,
    DDP when launched under torchrun; everything seeded."""
    from accelerate import Accelerator

    from llava_reid.runtime import resolve_device, seed_everything

    device = resolve_device(device_pref)
    accelerator = Accelerator(
        cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no",
        gradient_accumulation_steps=grad_accum,
    )
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(seed)
    return accelerator


def derived_seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**62)
    return h


def warmup_cosine(total_steps: int, warmup_steps: int, warmup_factor: float = 0.0):
    """LambdaLR factor: linear warm-up from ``warmup_factor`` to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor + (1 - warmup_factor) * step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epoch_shard(n: int, epoch: int, seed: int, world: int, rank: int, per_process: int,
                lengths: Sequence[int] | None = None, group: int = 16) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation of ``n`` items cut into global
    batches of ``per_process * world`` (the incomplete last batch dropped), each split across
    ranks. Returns a list of index lists, one per step.

    With ``lengths``, batches hold items of similar length: the permutation is cut into groups
    of ``group`` global batches, each group is sorted by length and cut into batches, and the
    batch order is shuffled (seeded). Right-padding to a batch's longest row then wastes little
    (a random batch of the embedded default's SFT data is ~17 % padding) while batches still
    mix items from across the data set."""
    global_batch = per_process * world
    steps = n // global_batch
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))
    batches = order[: steps * global_batch]
    if lengths is not None and group > 1:
        if len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} items")
        chunk = group * global_batch
        keep = batches.tolist()
        keep = [i for s in range(0, len(keep), chunk)
                for i in sorted(keep[s : s + chunk], key=lambda i: -lengths[i])]
        shuffle = torch.randperm(steps, generator=torch.Generator().manual_seed(
            derived_seed(seed, epoch, 1)))
        batches = torch.tensor(keep, dtype=torch.long).view(steps, global_batch)[shuffle]
    batches = batches.reshape(steps, world, per_process)
    return [batches[s, rank].tolist() for s in range(steps)]


def inputs_fingerprint(*paths: str | Path | None) -> str:
    """Identity of a stage's input files: every file's path, size and modification time.

    Part of every checkpoint tag, next to the config: Snakemake reruns a training stage when
    an input was rewritten (new data, a retrained upstream model) at the same path, and such a
    run must start over, not resume from the last run's checkpoint; a rerun after an
    interruption sees the very same files and resumes. Stat only, so cheap for big models."""
    h = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        root = Path(path)
        files = [root] if root.is_file() else sorted(
            Path(d) / f for d, _, names in os.walk(root) for f in names)
        h.update(f"{root}\0".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(root) if f != root else ''}\0{st.st_size}\0"
                     f"{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


class ResumableCheckpoint:
    """``folder/last``: whatever the stage saves plus optimizer, scheduler and a JSON state,
    tagged with a hash of the config and ``inputs_fingerprint`` so that a changed config or
    rewritten inputs start over instead of resuming."""

    def __init__(self, folder: str | Path, tag: str):
        self.folder = Path(folder)
        self.tag = tag

    @property
    def last(self) -> Path:
        return self.folder / "last"

    def load_state(self) -> dict[str, Any] | None:
        meta = self.last / "state.json"
        if not meta.exists():
            return None
        state = json.loads(meta.read_text())
        if state.get("config_hash") != self.tag:
            log.info("checkpoint in %s is from another config or other input files: starting over",
                     self.folder)
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        return state

    def save(self, save_model: Callable[[Path], None], optimizer, scheduler,
             state: dict[str, Any]) -> None:
        with atomic_dir(self.last) as tmp:
            save_model(tmp)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "config_hash": self.tag}))

    def restore_trainer(self, optimizer, scheduler) -> None:
        saved = torch.load(self.last / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
