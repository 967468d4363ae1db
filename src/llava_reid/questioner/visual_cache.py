"""cache-visual-tokens: every gallery image's visual tokens, computed once, in one file.

The questioner's visual tokens (vision tower -> projector -> pooling -> unpadding -> newlines)
depend on the image and on those weights only, never on the text, so each gallery image is
encoded once per split and reused by every SFT step, joint-training step, dialogue round and
evaluation chunk.

File layout (safetensors): ``tokens`` [sum T_i, D], ``offsets`` int64 [G + 1] (image i owns
rows offsets[i]:offsets[i+1]), ``image_idx`` int64 [G]. Its metadata holds ``weights_hash``,
a content hash of exactly the weights the tokens depend on (vision tower, projector, image
newline) plus the layout settings. Readers compare it with the model they run: a projector
changed by training makes the cache stale, and loading it fails with a clear error instead of
silently feeding the wrong tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from llava_reid.artifacts import ArtifactError, atomic_path
from llava_reid.data.annotations import read_annotations
from llava_reid.stage_views import config_key, typed_view

log = logging.getLogger(__name__)

# Caches up to this size are loaded into memory; larger ones are read lazily from disk.
IN_MEMORY_BYTES = 4 << 30


def weights_hash(questioner, extra: dict[str, Any] | None = None) -> str:
    """Content hash of the weights and settings the visual tokens depend on."""
    base = questioner.base
    h = hashlib.blake2b(digest_size=16)
    modules = {
        "vision_tower": base.model.vision_tower,
        "projector": base.model.multi_modal_projector,
    }
    for prefix, module in modules.items():
        for name, p in sorted(module.state_dict().items()):
            h.update(f"{prefix}.{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(base.model.image_newline.detach().float().cpu().numpy().tobytes())
    settings = {
        "pool_ratio": questioner.pool_ratio,
        "vision_feature_layer": base.config.vision_feature_layer,
        "mean": questioner.preprocess.mean.flatten().tolist(),
        "std": questioner.preprocess.std.flatten().tolist(),
        **(extra or {}),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def build_cache(questioner, paths: Sequence[Path], image_idx: Sequence[int], out: str | Path,
                batch_size: int, source: str = "") -> None:
    """Encode every image of ``paths`` and write the cache file atomically."""
    chunks: list[torch.Tensor] = []
    lengths: list[int] = []
    for start in range(0, len(paths), batch_size):
        images = []
        for p in paths[start : start + batch_size]:
            with Image.open(p) as img:
                images.append(img.convert("RGB"))
        for toks in questioner.encode_images(images):
            chunks.append(toks.cpu())
            lengths.append(int(toks.shape[0]))
    if not chunks:
        raise ArtifactError(f"{out}: no images to encode")
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    tensors = {
        "tokens": torch.cat(chunks).contiguous(),
        "offsets": offsets,
        "image_idx": torch.tensor(list(image_idx), dtype=torch.int64),
    }
    meta = {"weights_hash": weights_hash(questioner), "source": source,
            "images": str(len(lengths)), "dim": str(tensors["tokens"].shape[1])}
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


class VisualTokenCache:
    """Read side: ``tokens([image_idx, ...])`` -> list of [T_i, D] tensors on ``device``."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise ArtifactError(f"{self.path}: visual-token cache not found")
        self.device = torch.device(device)
        self.dtype = dtype
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # safetensors raises several types for a broken file
            raise ArtifactError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        keys = set(self._file.keys())
        missing = {"tokens", "offsets", "image_idx"} - keys
        if missing:
            raise ArtifactError(f"{self.path}: tensors {sorted(missing)} missing")
        self.metadata = self._file.metadata() or {}
        self.offsets = self._file.get_tensor("offsets")
        ids = self._file.get_tensor("image_idx").tolist()
        self.row_of = {int(v): i for i, v in enumerate(ids)}
        token_slice = self._file.get_slice("tokens")
        shape = token_slice.get_shape()
        self.dim = int(shape[1])
        nbytes = shape[0] * shape[1] * 4
        self._all = None
        if nbytes <= IN_MEMORY_BYTES:
            self._all = self._cast(self._file.get_tensor("tokens"))

    @property
    def weights_hash(self) -> str:
        return self.metadata.get("weights_hash", "")

    def check_model(self, questioner) -> None:
        """Fail unless the cache was made with ``questioner``'s visual weights."""
        current = weights_hash(questioner)
        if current != self.weights_hash:
            raise ArtifactError(
                f"{self.path}: visual tokens were computed with other vision/projector weights "
                f"(cache {self.weights_hash[:12]}, model {current[:12]}); rebuild the cache "
                "(the projector was trained, or the model path changed)"
            )

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype or t.dtype)

    def __contains__(self, image_idx: int) -> bool:
        return int(image_idx) in self.row_of

    def __len__(self) -> int:
        return len(self.row_of)

    def tokens(self, image_ids: Sequence[int]) -> list[torch.Tensor]:
        out = []
        for image in image_ids:
            row = self.row_of.get(int(image))
            if row is None:
                raise KeyError(f"{self.path}: image_idx {image} is not in the cache")
            a, b = int(self.offsets[row]), int(self.offsets[row + 1])
            if self._all is not None:
                out.append(self._all[a:b])
            else:
                out.append(self._cast(self._file.get_slice("tokens")[a:b]))
        return out


@dataclass(frozen=True)
class VisualCacheConfig:
    """Every setting cache-visual-tokens reads, built once from its validated config view."""

    seed: int
    device: str
    batch_size: int = config_key("questioner.cache_batch_size")  # images encoded at once
    # The questioner section as passed: what loading the questioner reads.
    questioner: Mapping[str, Any]


def run(cfg: dict[str, Any], annotations: str, image_root: str, model: str, split: str,
        out: str, adapter: str | None = None) -> None:
    from llava_reid.questioner.model import Questioner

    settings = typed_view(VisualCacheConfig, cfg)
    rows = read_annotations(annotations, split=split)
    if rows.empty:
        raise ArtifactError(f"{annotations}: split {split!r} has no images")
    questioner = Questioner.from_pretrained(model, settings.questioner, settings.device)
    if adapter:
        questioner.load_adapter(adapter, merge=True)
    questioner.compile_vision_tower()
    root = Path(image_root)
    build_cache(questioner, [root / p for p in rows.file_path], rows.image_idx.tolist(), out,
                settings.batch_size, source=f"{model} {split}")
    first = VisualTokenCache(out)
    log.info("%s: %d images, %.1f visual tokens per image, dim %d -> %s", split, len(first),
             float(first.offsets[-1]) / len(first), first.dim, out)
