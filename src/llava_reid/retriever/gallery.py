"""A split's cached gallery features on the compute device, and ranking against them.

Every stage that ranks (prepare_data's look-ahead oracle, selector training, evaluation)
ranks through this class, against the features written by cache-features: gallery images are
never re-encoded. Ties are broken like llava_reid.metrics: higher similarity first, then the
lower gallery position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llava_reid.artifacts import embeddings, read_table
from llava_reid.metrics import target_ranks


@dataclass
class Gallery:
    feats: torch.Tensor  # [G, D], L2-normalised
    pids: torch.Tensor  # [G]
    image_idx: torch.Tensor  # [G] dataset-wide image ids
    file_paths: list[str]

    @classmethod
    def from_parquet(cls, path: str, device: torch.device | str = "cpu") -> Gallery:
        table = read_table(path, "gallery_features")
        # Arrow's buffers are read-only and torch wants writable arrays: one small copy each.
        feats = torch.from_numpy(embeddings(table, "feat").copy()).to(device)
        pids = np.array(table.column("pid").to_numpy())
        image_idx = table.column("image_idx").to_numpy().astype(np.int64)
        return cls(
            feats=torch.nn.functional.normalize(feats, dim=-1),
            pids=torch.from_numpy(pids).to(device),
            image_idx=torch.from_numpy(image_idx).to(device),
            file_paths=table.column("file_path").to_pylist(),
        )

    def __len__(self) -> int:
        return len(self.pids)

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def position_of(self) -> dict[int, int]:
        """image_idx -> row in this gallery."""
        return {int(v): i for i, v in enumerate(self.image_idx.tolist())}

    def similarity(self, query_feats: torch.Tensor) -> torch.Tensor:
        return query_feats.to(self.device, self.feats.dtype) @ self.feats.t()

    def target_ranks(
        self, query_feats: torch.Tensor, target_pids: torch.Tensor, chunk: int = 1024
    ) -> torch.Tensor:
        """1-based rank of the best-ranked image of each query's identity [Q]."""
        out = []
        for s in range(0, len(query_feats), chunk):
            sim = self.similarity(query_feats[s : s + chunk])
            ranks = target_ranks(sim, target_pids[s : s + chunk].to(self.device), self.pids)
            out.append(torch.as_tensor(np.asarray(ranks), dtype=torch.long))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def target_ranks_and_margins(
        self, query_feats: torch.Tensor, target_pids: torch.Tensor, chunk: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``target_ranks`` and, from the same similarities, each query's margin: its best
        image of its identity minus its best image of any other identity [Q] (> 0 exactly
        when the target ranks first)."""
        ranks, margins = [], []
        for s in range(0, len(query_feats), chunk):
            sim = self.similarity(query_feats[s : s + chunk]).float()
            pids = target_pids[s : s + chunk].to(self.device)
            ranks.append(torch.as_tensor(np.asarray(target_ranks(sim, pids, self.pids)),
                                         dtype=torch.long))
            own = self.pids[None, :] == pids[:, None]
            best_own = sim.masked_fill(~own, -torch.inf).max(dim=1).values
            best_other = sim.masked_fill(own, -torch.inf).max(dim=1).values
            margins.append((best_own - best_other).cpu())
        if not ranks:
            return torch.empty(0, dtype=torch.long), torch.empty(0)
        return torch.cat(ranks), torch.cat(margins)

    def top_k(self, query_feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
        """Gallery rows of the top ``k`` images per query, best first [Q, k] (stable ties)."""
        k = min(k, len(self))
        out = []
        for s in range(0, len(query_feats), chunk):
            sim = self.similarity(query_feats[s : s + chunk])
            order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
            out.append(order)
        if not out:
            return torch.empty(0, k, dtype=torch.long, device=self.device)
        return torch.cat(out)
