"""Our own image preprocessing and visual-token layout for LLaVA-OneVision (no processor).

Per image (a pedestrian crop, typically 1:3 wide:tall):

1. pad to a square with the encoder's mean colour, resize to the vision tower's input size,
   normalise (SigLIP: mean = std = 0.5);
2. vision tower -> hidden states of ``vision_feature_layer`` -> projector: a g x g grid of
   tokens in the language model's width (g = 27 for SigLIP-so400m-384);
3. bilinear pooling of the grid to ceil(g / pool_ratio) per side (27 -> 14 at ratio 2);
4. unpadding: the grid rows/columns that only saw the square padding are dropped (a 128x384
   crop keeps 4 of the 14 columns);
5. one learned ``image_newline`` embedding after each row.

A 128x384 crop becomes 14 x (4 + 1) = 70 tokens. These tokens depend on the image alone, never
on the text, so they are computed once per gallery image and cached
(llava_reid.questioner.visual_cache).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    img = img.convert("RGB")
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


class VisionPreprocessor:
    """PIL image -> normalised square tensor [3, S, S] and its original (height, width)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.fill = tuple(int(round(255 * m)) for m in mean)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        original = (img.height, img.width)
        square = pad_to_square(img, self.fill).resize(
            (self.size, self.size), Image.Resampling.BICUBIC
        )
        x = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)
        x = x.float().div_(255.0)
        return (x - self.mean) / self.std, original

    def batch(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        pixels, sizes = zip(*(self(img) for img in images), strict=True)
        return torch.stack(pixels), list(sizes)


def pooled_side(grid: int, pool_ratio: float) -> int:
    return grid if pool_ratio <= 1 else math.ceil(grid / pool_ratio)


def content_box(side: int, original: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the cells of a ``side`` x ``side`` grid that cover the image
    of size ``original`` (height, width) once it was centred on a square canvas.

    The kept extent is floor(side * short / long) cells (at least one), centred: for a 1:3 crop
    on a 14-cell grid, 4 columns."""
    h, w = original
    if w < h:
        keep = max(1, int(side * w / h))
        start = (side - keep) // 2
        return 0, side, start, start + keep
    if h < w:
        keep = max(1, int(side * h / w))
        start = (side - keep) // 2
        return start, start + keep, 0, side
    return 0, side, 0, side


def tokens_per_image(grid: int, pool_ratio: float, original: tuple[int, int]) -> int:
    r0, r1, c0, c1 = content_box(pooled_side(grid, pool_ratio), original)
    return (r1 - r0) * (c1 - c0 + 1)


def layout_tokens(
    projected: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    newline: torch.Tensor,
    pool_ratio: float,
) -> list[torch.Tensor]:
    """Projected patch tokens [B, g*g, D] -> per image [rows * (cols + 1), D] (steps 3-5)."""
    b, n, d = projected.shape
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"expected a square grid of patch tokens, got {n}")
    grid = projected.transpose(1, 2).reshape(b, d, g, g)
    side = pooled_side(g, pool_ratio)
    if side != g:
        grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear").to(grid.dtype)
    out = []
    for i, original in enumerate(sizes):
        r0, r1, c0, c1 = content_box(side, original)
        cells = grid[i, :, r0:r1, c0:c1].permute(1, 2, 0)  # [rows, cols, D]
        nl = newline.to(cells.dtype).view(1, 1, d).expand(cells.shape[0], 1, d)
        out.append(torch.cat([cells, nl], dim=1).reshape(-1, d))
    return out


def project_patches(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Vision tower + projector of a transformers LlavaOnevisionForConditionalGeneration:
    [B, 3, S, S] -> [B, g*g, D_text]. The tower always runs without gradients (it is never
    trained here); the projector keeps them when it trains."""
    cfg = model.config
    inner = model.model
    with torch.no_grad():
        out = inner.vision_tower(pixel_values=pixels, output_hidden_states=True)
    layers = cfg.vision_feature_layer
    if isinstance(layers, int):
        feats = out.hidden_states[layers]
    else:
        feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return inner.multi_modal_projector(feats)


def visual_tokens(
    model: nn.Module, pixels: torch.Tensor, sizes: Sequence[tuple[int, int]], pool_ratio: float
) -> list[torch.Tensor]:
    """Every step of the module docstring for a batch of preprocessed images."""
    projected = project_patches(model, pixels)
    return layout_tokens(projected, sizes, model.model.image_newline, pool_ratio)
