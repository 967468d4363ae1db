"""Retriever image preprocessing and augmentation (torch + PIL, no torchvision).

Evaluation: resize to (height, width), to tensor, normalise with CLIP's mean/std.
Training adds, as IRRA does: horizontal flip (p=0.5), zero-pad 10 px and random crop back to
size, and random erasing (p=0.5, area 2-40 %, filled with the mean, i.e. 0 after
normalisation). Every random draw comes from the generator passed in, so augmentation is
reproducible whatever the number of data-loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """PIL RGB -> normalised float tensor [3, H, W]."""
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    x = arr.permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    return (x - mean_t) / std_t


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=g))


def random_erase(
    x: torch.Tensor,
    g: torch.Generator,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Erase one random rectangle (value 0 = the normalised mean), with probability p."""
    if _rand(g) >= p:
        return x
    _, h, w = x.shape
    area = h * w
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * _rand(g))
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(g)
        aspect = math.exp(log_r)
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top, left = _randint(g, 0, h - eh), _randint(g, 0, w - ew)
            x = x.clone()
            x[:, top : top + eh, left : left + ew] = 0.0
            return x
    return x


class RetrieverTransform:
    """Callable ``(PIL image, generator | None) -> tensor [3, height, width]``."""

    def __init__(self, height: int, width: int, train: bool, pad: int = 10):
        self.height, self.width, self.train, self.pad = height, width, train, pad

    def resize(self, img: Image.Image) -> Image.Image:
        """The deterministic part: RGB at (height, width). Cacheable per image."""
        return img.convert("RGB").resize((self.width, self.height), Image.Resampling.BICUBIC)

    def __call__(self, img: Image.Image, g: torch.Generator | None = None) -> torch.Tensor:
        if img.size != (self.width, self.height) or img.mode != "RGB":
            img = self.resize(img)
        x = to_tensor(img)
        if not self.train:
            return x
        if g is None:
            raise ValueError("training transform needs a torch.Generator")
        if _rand(g) < 0.5:
            x = x.flip(-1)
        # Pad with zeros in pixel space (= -mean/std after normalisation), then crop.
        fill = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)
        padded = fill.expand(3, self.height + 2 * self.pad, self.width + 2 * self.pad).clone()
        padded[:, self.pad : self.pad + self.height, self.pad : self.pad + self.width] = x
        top, left = _randint(g, 0, 2 * self.pad), _randint(g, 0, 2 * self.pad)
        x = padded[:, top : top + self.height, left : left + self.width]
        return random_erase(x, g)


def load_pixels(paths: Iterable[str | Path],
                transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Decode each image file and stack its transformed pixels: [N, C, H, W]."""
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(transform(img))
    return torch.stack(images) if images else torch.empty(0)
