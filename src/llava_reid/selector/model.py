"""The candidate selector: scores the retrieval pool given the query, as a log-distribution.

Each dialogue round the questioner sees the retriever's top-1 plus a few more images. Plain
top-k shows the next best ones, which may be near-duplicates of the top-1 and so give the
questioner little to tell apart. The selector looks at the query and the whole valid part of the pool at once
(a transformer over ``[text; images]``) and scores every pool position; a subset sampler
(``selector.sampler``) then draws the extra candidates from those scores.

Inputs are the retriever's L2-normalised features. Unit vectors have entries of size about
1/sqrt(D); scaling them by sqrt(D) brings them to unit-size entries, the scale the
transformer's initialisation expects. A learned modality embedding tells the text token from
the image tokens; there is deliberately no position embedding, so the scores depend on the
features only and not on where the retriever happened to put an image.

Optional ``retrieval_prior``: add the query-image cosine, times a learned scale initialised
at the retriever's logit scale (1/0.02), to the logits, and start the head at zero. The
selector then starts as exactly plain top-k and its transformer learns corrections to it.
Without it the transformer has to rebuild the retriever's ranking to the precision of
neighbouring ranks from raw features, which it does poorly (``selector.warmup``).

The artifact is one safetensors file whose metadata holds the JSON config, so a checkpoint
cannot be separated from the sizes needed to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llava_reid.artifacts import ArtifactError, atomic_path, reading

INVALID_SCORE = -1e4  # score of a pool position the selector may not pick
FILE_NAME = "selector.safetensors"  # file name used when save/load are given a folder
FORMAT = "llava_reid.selector/1"
PRIOR_SCALE = 50.0  # initial logit scale of the optional retrieval prior


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, shapes, dtypes and bytes: safetensors has no checksum,
    so a flipped byte in the weights would otherwise load without a word."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file(path: str | Path) -> Path:
    """``path`` itself when it names a .safetensors file, else ``path/selector.safetensors``."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / FILE_NAME


class Selector(nn.Module):
    """Transformer encoder over ``[query; pool images]`` -> one log-probability per position."""

    def __init__(
        self, dim: int, layers: int = 5, heads: int = 8, ffn: int = 2048, dropout: float = 0.1,
        retrieval_prior: bool = False,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"selector: dim {dim} is not divisible by heads {heads}")
        self._config = {
            "dim": int(dim), "layers": int(layers), "heads": int(heads), "ffn": int(ffn),
            "dropout": float(dropout), "retrieval_prior": bool(retrieval_prior),
        }
        self.modality = nn.Embedding(2, dim)  # 0 = query text, 1 = pool image
        layer = nn.TransformerEncoderLayer(
            dim, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=False
        )
        # Nested tensors (eval only) would drop padded positions; keep one layout in both modes.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 1, bias=False)
        if retrieval_prior:
            # Start as the retriever's own distribution over the pool (logit scale 1/0.02):
            # with a zero head the initial deterministic top-k is exactly plain top-k.
            self.prior_log_scale = nn.Parameter(torch.tensor(math.log(PRIOR_SCALE)))
            nn.init.zeros_(self.head.weight)

    # -- config and persistence -------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Selector:
        return cls(**config)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the weights and config to one safetensors file, atomically; returns its path.

        ``path`` is a ``.safetensors`` file or a folder (then ``selector.safetensors`` in it).
        ``extra`` is stored as JSON strings in the metadata (provenance: data, config hash).
        """
        target = _file(path)
        meta = {"format": FORMAT, "config": json.dumps(self.config, sort_keys=True)}
        for key, value in (extra or {}).items():
            meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta["sha256"] = tensors_digest(tensors)
        with atomic_path(target, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return target

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, str]:
        """The file's metadata (``format``, ``config`` and any ``extra`` keys), as strings."""
        with reading(_file(path), "the selector"), safe_open(str(_file(path)),
                                                             framework="pt") as f:
            return dict(f.metadata() or {})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> Selector:
        """Rebuild a saved selector on ``device``, in eval mode."""
        target = _file(path)
        if not target.exists():
            raise FileNotFoundError(f"{target}: no selector checkpoint")
        meta = cls.read_metadata(target)
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ArtifactError(f"{target}: not a selector checkpoint (format {meta.get('format')!r})")
        model = cls.from_config(json.loads(meta["config"]))
        with reading(target, "the selector's weights"):
            state = load_file(str(target))
            if meta.get("sha256") and tensors_digest(state) != meta["sha256"]:
                raise ArtifactError(f"{target}: corrupted selector (its weights do not match "
                                    "their checksum); delete it so that it is rebuilt")
            model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    # -- scoring ------------------------------------------------------------------------------

    def forward(
        self, query_feat: torch.Tensor, pool_feats: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Log-softmax scores over the valid pool positions.

        query_feat: [B, D] query text feature; pool_feats: [B, P, D] image features of the
        selectable pool positions (the caller drops the top-1); valid: [B, P] bool.
        Returns float32 [B, P] (whatever the input dtype, e.g. bf16 on GPU): log-probabilities
        on valid positions, ``INVALID_SCORE`` elsewhere (everywhere for a row with none valid).
        """
        batch, positions, dim = pool_feats.shape
        if query_feat.shape != (batch, dim) or valid.shape != (batch, positions):
            raise ValueError(
                f"selector: shapes query {tuple(query_feat.shape)}, pool "
                f"{tuple(pool_feats.shape)}, valid {tuple(valid.shape)} do not agree"
            )
        valid = valid.bool()
        out = torch.full((batch, positions), INVALID_SCORE, device=pool_feats.device,
                         dtype=torch.float32)
        used = valid.any(dim=0).nonzero()
        if used.numel() == 0:
            return out
        # Trailing columns that no row may pick cannot influence the valid ones (they are
        # masked keys), so drop them: rounds with a short valid pool cost proportionally less.
        width = int(used.max()) + 1
        feats, keep = pool_feats[:, :width], valid[:, :width]  # [B, W, D], [B, W]

        scale = math.sqrt(dim)
        text = query_feat.unsqueeze(1) * scale + self.modality.weight[0]  # [B, 1, D]
        images = feats * scale + self.modality.weight[1]  # [B, W, D]
        tokens = torch.cat([text, images], dim=1)  # [B, 1 + W, D]
        padding = torch.cat([keep.new_zeros(batch, 1), ~keep], dim=1)  # [B, 1 + W], True = pad
        # Without padding (a batch of one round after the cut) skip the mask: SDPA then takes
        # its fused kernels instead of the masked reference path.
        hidden = self.encoder(tokens, src_key_padding_mask=padding if padding.any() else None)
        logits = self.head(hidden[:, 1:]).squeeze(-1).float()  # [B, W]
        if self._config["retrieval_prior"]:
            # fp32 even under bf16 autocast: neighbouring ranks differ by ~1e-3 in cosine.
            with torch.autocast(pool_feats.device.type, enabled=False):
                cosine = torch.einsum("bd,bwd->bw", query_feat.float(), feats.float())  # [B, W]
            logits = logits + self.prior_log_scale.float().exp() * cosine
        logits = logits.masked_fill(~keep, INVALID_SCORE)
        scores = torch.log_softmax(logits, dim=-1).masked_fill(~keep, INVALID_SCORE)
        return torch.cat([scores, out[:, width:]], dim=1)  # [B, P]
