"""What a stage cost: wall time and peak GPU memory, logged when the stage ends, so a cluster
user can size a rule's memory request from its log (Snakemake's benchmark TSV has the host's
RSS but not the GPU's)."""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("llava_reid.usage")


class StageUsage:
    """Measures one stage from construction to ``report()``."""

    def __init__(self, stage: str):
        self.stage = stage
        self.started = time.perf_counter()

    def report(self) -> dict[str, float]:
        usage = {"seconds": time.perf_counter() - self.started}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gib = 2**30
            usage["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / gib
            usage["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / gib
        log.info("usage %s: %s", self.stage,
                 " ".join(f"{k}={v:.2f}" for k, v in usage.items()))
        return usage
