"""Inference-side retriever: load a trained model folder and encode images or texts.

The folder holds the CLIP weights + tokenizer (``save_pretrained``) and ``retriever.json``
(input size, text context, temperature), written by train-retriever.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llava_reid.artifacts import reading
from llava_reid.data.transforms import RetrieverTransform, load_pixels
from llava_reid.retriever.model import QueryTokenizer, Retriever, load_clip, load_tokenizer
from llava_reid.runtime import default_dtype, resolve_device

SETTINGS_FILE = "retriever.json"


SETTINGS_KEYS = ("image_height", "image_width", "text_length", "temperature", "image_pooling")


def retriever_settings(rcfg: dict) -> dict:
    """What encoding needs from the retriever config (input size, text context, pooling)."""
    return {k: rcfg[k] for k in SETTINGS_KEYS}


def write_settings(folder: str | Path, rcfg: dict) -> None:
    text = json.dumps(retriever_settings(rcfg), indent=2) + "\n"
    (Path(folder) / SETTINGS_FILE).write_text(text, encoding="utf-8")


class RetrieverEncoder:
    """Encodes images and texts to L2-normalised features (float32, on ``device``)."""

    def __init__(self, model: Retriever, tokenizer, settings: dict, device: torch.device):
        self.model = model.eval()
        self.settings = settings
        self.device = device
        self.tokenize = QueryTokenizer(tokenizer, settings["text_length"])
        self.transform = RetrieverTransform(
            settings["image_height"], settings["image_width"], train=False
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "auto") -> RetrieverEncoder:
        folder = Path(folder)
        settings_path = folder / SETTINGS_FILE
        if not settings_path.exists():
            raise FileNotFoundError(f"{settings_path}: not a trained retriever folder")
        with reading(settings_path, "the retriever's settings"):
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        dev = resolve_device(device)
        clip = load_clip(folder, dtype=default_dtype(dev))
        model = Retriever(clip, num_classes=0, with_mlm=False,
                          image_pooling=settings.get("image_pooling", "cls")).to(dev)
        return cls(model, load_tokenizer(folder), settings, dev)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(list(texts[start : start + batch_size]))
            feats = self.model.encode_text(ids.to(self.device), mask.to(self.device))
            out.append(F.normalize(feats.float(), dim=-1))
        if not out:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat(out)

    def encode_texts_once(self, texts: Sequence[str], batch_size: int = 256
                          ) -> tuple[torch.Tensor, int]:
        """Each text's feature [N, D] on the CPU, every distinct text encoded once (in sorted
        order, so the batches do not depend on how often a text repeats); and how many texts
        were distinct."""
        distinct, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        feats = self.encode_texts(list(distinct), batch_size).float().cpu()
        return feats[torch.from_numpy(inverse.reshape(-1))], len(distinct)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        feats = self.model.encode_image(pixels.to(self.device, dtype))
        return F.normalize(feats.float(), dim=-1)

    def encode_images(self, paths: Sequence[str | Path], batch_size: int = 256) -> torch.Tensor:
        out = [self.encode_pixels(load_pixels(paths[start : start + batch_size], self.transform))
               for start in range(0, len(paths), batch_size)]
        if not out:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat(out)
