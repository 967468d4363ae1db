"""The one training loop of every training stage, and what it needs: seeds, schedules,
sharding, batch sizing and resumable checkpoints.

A stage builds its model, optimizer and schedule and gives ``TrainingLoop`` a step function
(indices of one batch -> loss); the loop owns the epoch/step resume, the optimizer mechanics,
loss summaries, progress logs with an ETA, checkpoints and the final save. The progress is
log lines, not tqdm: a job's log is a file, where tqdm's bars are carriage-return redraws that
drop the loss and the timestamps (measured: bench/progress_logs.py, bench/RESULTS.md).

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llava_reid.artifacts import ArtifactError, atomic_dir

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
    while batches still mix items from across the data set."""
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


@dataclass(frozen=True)
class BatchPlan:
    """How ``items`` examples are cut into steps: ``per_process`` examples per rank and step,
    ``steps`` steps per epoch (the incomplete last global batch dropped)."""

    items: int
    per_process: int
    steps: int
    world: int
    rank: int

    @classmethod
    def make(cls, items: int, batch_size: int, world: int, rank: int, source: str,
             what: str = "examples") -> BatchPlan:
        per_process = max(1, batch_size // world)
        steps = items // (per_process * world)
        if steps == 0:
            raise ValueError(f"{source}: {items} {what} < batch size {batch_size}")
        return cls(items, per_process, steps, world, rank)


# Bumped when the checkpoint's state layout changes: an older checkpoint starts over.
STATE_FORMAT = 2


class ResumableCheckpoint:
    """``folder/last``: whatever the stage saves plus optimizer, scheduler and a JSON state,
    tagged with a hash of the config and ``inputs_fingerprint`` so that a changed config or
    rewritten inputs start over instead of resuming. Removed once the stage's outputs are
    written (``clear``), so only an interrupted run resumes and a forced rerun trains again."""

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
        try:
            state = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("checkpoint state %s is unreadable (%s): starting over", meta, exc)
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        if state.get("config_hash") != self.tag or state.get("format") != STATE_FORMAT:
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
            (tmp / "state.json").write_text(json.dumps(
                {**state, "config_hash": self.tag, "format": STATE_FORMAT}), encoding="utf-8")

    def restore_trainer(self, optimizer, scheduler) -> None:
        path = self.last / "trainer.pt"
        try:
            saved = torch.load(path, weights_only=True)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        except Exception as exc:
            raise ArtifactError(
                f"{path}: cannot restore the optimizer and schedule from this checkpoint "
                f"({type(exc).__name__}: {exc}); delete {self.folder} to start over") from exc

    def clear(self) -> None:
        """The stage's outputs are written: nothing left to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)


def restore_file(path: Path, load: Callable[[str], Any]) -> Any:
    """``load(path)`` of a checkpoint file; a failure names the file and the way out."""
    try:
        return load(str(path))
    except Exception as exc:
        raise ArtifactError(f"{path}: cannot restore from this checkpoint "
                            f"({type(exc).__name__}: {exc}); delete {path.parent.parent} to "
                            f"start over") from exc


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# step(module, batch indices, epoch, step) -> (loss, parts): ``parts`` are floats summed into
# the epoch's mean losses; a "record" dict among them goes into the per-step history instead.
StepFn = Callable[[Any, list[int], int, int], tuple[torch.Tensor, dict[str, Any]]]
# end_of_epoch(epoch, mean losses, state, the epoch's start time) -> text for its log line
EpochHook = Callable[[int, dict[str, float], dict[str, Any], float], str]


class TrainingLoop:
    """Epochs of seeded, sharded batches with resumable checkpoints.

    ``state`` (kept in the checkpoint): ``epoch`` epochs done, ``step`` steps done in the next
    one, ``history`` and whatever the stage adds (``initial``). A checkpoint is written every
    ``checkpoint_every`` steps (0: never mid-epoch) and after every epoch; ``save_models`` writes
    the stage's weights into the checkpoint folder. A resumed run restores the optimizer and
    schedule here; the stage restores its weights from ``checkpoint.last`` itself before
    building the loop (it knows their layout)."""

    def __init__(self, name: str, accelerator, module, optimizer, scheduler,
                 checkpoint: ResumableCheckpoint, state: dict[str, Any] | None,
                 save_models: Callable[[Path], None], plan: BatchPlan, *, epochs: int,
                 seed: int, lengths: Sequence[int] | None = None, checkpoint_every: int = 0,
                 max_grad_norm: float = 0.0, clip_params: Sequence[torch.nn.Parameter] = (),
                 step_history: bool = True, log_every: int = 20,
                 initial: dict[str, Any] | None = None):
        self.name, self.accelerator = name, accelerator
        self.checkpoint, self.save_models, self.plan = checkpoint, save_models, plan
        self.epochs, self.seed, self.lengths = epochs, seed, lengths
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.max_grad_norm, self.clip_params = max_grad_norm, list(clip_params)
        self.step_history = step_history
        self.scheduler = scheduler
        if state is not None:
            checkpoint.restore_trainer(optimizer, scheduler)
            log.info("%s: resuming after epoch %d step %d of %d epochs x %d steps", name,
                     state["epoch"], state["step"], epochs, plan.steps)
        else:
            state = {"epoch": 0, "step": 0, "history": [], **(initial or {})}
        self.state = state
        self.module, self.optimizer = accelerator.prepare(module, optimizer)

    @property
    def total_steps(self) -> int:
        return self.plan.steps * self.epochs

    def _save(self) -> None:
        if self.accelerator.is_main_process:
            self.checkpoint.save(self.save_models, self.optimizer, self.scheduler, self.state)
        self.accelerator.wait_for_everyone()

    def _optimize(self, step: StepFn, indices: list[int], epoch: int, s: int):
        acc = self.accelerator
        with acc.accumulate(self.module):
            with acc.autocast():
                loss, parts = step(self.module, indices, epoch, s)
            acc.backward(loss)
            if acc.sync_gradients and self.max_grad_norm > 0:
                acc.clip_grad_norm_(self.clip_params, self.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, parts

    def run(self, step: StepFn, end_of_epoch: EpochHook | None = None) -> dict[str, Any]:
        """Train the remaining epochs; returns the final state (on the main process: with the
        whole history, resumed runs included)."""
        state, plan = self.state, self.plan
        started, done_here = time.time(), 0
        done_before = state["epoch"] * plan.steps + state["step"]
        log.info("%s: %d epochs x %d steps (%d per process per step, %d processes)", self.name,
                 self.epochs, plan.steps, plan.per_process, plan.world)
        for epoch in range(state["epoch"] + 1, self.epochs + 1):
            epoch_started = time.time()
            self.module.train()
            shard = epoch_shard(plan.items, epoch, self.seed, plan.world, plan.rank,
                                plan.per_process, self.lengths)
            sums: dict[str, float] = dict(state.pop("epoch_sums", {}))
            for s in range(state["step"], len(shard)):
                loss, parts = self._optimize(step, shard[s], epoch, s)
                record = parts.pop("record", None)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                value = loss.item()
                if self.step_history:
                    state["history"].append({"epoch": epoch, "step": s + 1, **(record or {}),
                                             "loss": round(value, 4)})
                done_here += 1
                if s % self.log_every == 0:
                    self._log_step(epoch, s, value, record, done_before + done_here, done_here,
                                   started)
                state["step"] = s + 1
                if self.checkpoint_every and (s + 1) % self.checkpoint_every == 0 \
                        and s + 1 < len(shard):
                    self._save_mid_epoch(sums)
            losses = {k: round(v / plan.steps, 4) for k, v in sums.items()}
            state["epoch"], state["step"] = epoch, 0
            extra = ""
            if end_of_epoch is not None and self.accelerator.is_main_process:
                extra = end_of_epoch(epoch, losses, state, epoch_started)
            self._save()
            remaining = (self.epochs - epoch) * plan.steps
            eta = (time.time() - started) / max(1, done_here) * remaining
            log.info("%s: epoch %d/%d done in %.1fs%s%s; ETA %s", self.name, epoch,
                     self.epochs, time.time() - epoch_started,
                     f" loss {losses}" if losses else "", f" {extra}" if extra else "",
                     _clock(eta))
        self.state = state
        return state

    def _save_mid_epoch(self, sums: dict[str, float]) -> None:
        if sums:
            self.state["epoch_sums"] = dict(sums)
        self._save()
        self.state.pop("epoch_sums", None)

    def _log_step(self, epoch: int, s: int, value: float, record: dict[str, Any] | None,
                  global_step: int, done_here: int, started: float) -> None:
        elapsed = time.time() - started
        eta = elapsed / done_here * (self.total_steps - global_step)
        extra = "".join(f" {k} {v:.3f}" for k, v in (record or {}).items())
        log.info("%s: epoch %d/%d step %d/%d (%d/%d) loss %.4f%s lr %.2e; %s elapsed, ETA %s",
                 self.name, epoch, self.epochs, s + 1, self.plan.steps, global_step,
                 self.total_steps, value, extra, self.scheduler.get_last_lr()[0],
                 _clock(elapsed), _clock(eta))

    def finish(self, write_outputs: Callable[[], None]) -> None:
        """The final save: the main process writes the stage's outputs, then the checkpoints
        go (a finished stage has nothing to resume; a forced rerun trains again)."""
        if self.accelerator.is_main_process:
            write_outputs()
            self.checkpoint.clear()
        self.accelerator.wait_for_everyone()
