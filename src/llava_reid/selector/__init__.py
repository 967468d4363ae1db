"""Candidate selector: which pool images, besides the top-1, the questioner gets to see.

``model.Selector`` scores the valid pool positions given the query; ``sampler`` turns scores
into candidates (a differentiable Gumbel-top-k for joint training, plain top-k for
evaluation); ``warmup`` is the stage that first teaches the selector to imitate plain top-k.
"""

from llava_reid.selector.model import INVALID_SCORE, Selector
from llava_reid.selector.sampler import (
    candidate_positions,
    gumbel_topk,
    selectable_mask,
    temperature_at,
    topk_positions,
    valid_length,
)

__all__ = [
    "INVALID_SCORE",
    "Selector",
    "candidate_positions",
    "gumbel_topk",
    "selectable_mask",
    "temperature_at",
    "topk_positions",
    "valid_length",
]
