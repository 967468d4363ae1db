"""Picking candidates from selector scores: a differentiable sampler (training) and top-k (eval).

Training draws subsets with the Gumbel-top-k trick: perturb each log-probability with
independent Gumbel noise and keep the k largest. That is an exact draw of k positions without
replacement from the selector's distribution (the Plackett-Luce model), so the warm-up can fit
the very distribution that joint training later samples from. Its gradient comes from the
relaxation of Xie & Ermon (2019, "Reparameterizable subset sampling via continuous
relaxations"): k successive tempered softmaxes over the perturbed scores, each one first
down-weighting the mass that the earlier steps already took. The hard k-hot is used in the
forward pass and the relaxation's gradient in the backward pass (straight-through), so the
questioner sees exactly k images while the selector still receives a signal.

Invalid positions carry the score ``INVALID_SCORE`` (see ``selector.model``); they are never
chosen. A row with fewer valid positions than k gets all of them and no more.
"""

from __future__ import annotations

import math

import torch

from llava_reid.selector.model import INVALID_SCORE

_INVALID_BELOW = INVALID_SCORE / 2  # log-probabilities never get this low; masked scores do


def _invalid(scores: torch.Tensor) -> torch.Tensor:
    return scores <= _INVALID_BELOW  # [B, P] bool


def gumbel_noise(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Standard Gumbel noise [shape] on ``device``, drawn on the generator's own device.

    Drawing where the generator lives keeps a seeded CPU generator usable with CUDA scores
    (and the draws identical on both), at the cost of one copy.
    """
    draw_on = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=draw_on, dtype=torch.float32)
    u = u.clamp_min(torch.finfo(torch.float32).tiny)  # rand may return 0 exactly
    return (-torch.log(-torch.log(u))).to(device)


def gumbel_topk(
    scores: torch.Tensor,
    k: int,
    temperature: float,
    generator: torch.Generator | None = None,
    hard: bool = True,
    straight_through: bool = True,
) -> torch.Tensor:
    """Sample k of the P pool positions per row; returns a [B, P] k-hot (``scores.dtype``).

    scores: [B, P] log-probabilities (``INVALID_SCORE`` = not selectable).
    hard=False: the relaxed k-hot (entries in [0, 1], each row sums to k), differentiable.
    hard=True, straight_through=True: the exact k-hot of the Gumbel-top-k draw in the forward
    pass, the relaxed k-hot's gradient in the backward pass.
    hard=True, straight_through=False: the same exact k-hot, detached (no gradient path).
    For a given generator state all three modes use the same noise, so the hard k-hot is the
    same whatever the mode.
    """
    if scores.dim() != 2:
        raise ValueError(f"gumbel_topk: scores must be [B, P], got {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"gumbel_topk: k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"gumbel_topk: temperature must be > 0, got {temperature}")
    logits = scores.float()  # [B, P]; the relaxation is unstable in bf16
    invalid = _invalid(logits.detach())  # [B, P]
    keys = logits + gumbel_noise(logits.shape, generator, logits.device)  # [B, P]

    khot = None
    if hard:
        picks = min(k, logits.shape[1])
        order = keys.detach().masked_fill(invalid, -math.inf).topk(picks, dim=1).indices
        khot = torch.zeros_like(logits).scatter_(1, order, 1.0).masked_fill_(invalid, 0.0)
        if not straight_through:
            return khot.to(scores.dtype)

    # Xie & Ermon relaxation: step i takes a tempered softmax of the keys after penalising
    # positions by log(1 - mass they received at step i-1), so mass is spread over k places.
    tiny = torch.finfo(torch.float32).tiny
    relaxed = torch.zeros_like(logits)  # [B, P], sums to k per row at the end
    step_keys, onehot = keys, torch.zeros_like(logits)
    for _ in range(k):
        step_keys = step_keys + torch.log((1.0 - onehot).clamp_min(tiny))
        onehot = torch.softmax(step_keys / temperature, dim=1)
        relaxed = relaxed + onehot
    if khot is None:
        return relaxed.to(scores.dtype)
    # hard + (relaxed - relaxed) is exactly ``hard`` in value, with the relaxed gradient.
    return (khot + (relaxed - relaxed.detach())).to(scores.dtype)


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best-scored valid positions per row, in position (= retrieval-rank) order.

    scores: [B, P]. Returns LongTensor [B, k]; ties go to the lower position. A row with fewer
    than k valid positions ends with -1 entries.
    """
    if scores.dim() != 2:
        raise ValueError(f"topk_positions: scores must be [B, P], got {tuple(scores.shape)}")
    batch, positions = scores.shape
    invalid = _invalid(scores)
    picks = min(k, positions)
    ranked = torch.sort(
        scores.detach().float().masked_fill(invalid, -math.inf), dim=1, descending=True,
        stable=True,
    ).indices[:, :picks]  # [B, picks], best first
    ranked = ranked.masked_fill(invalid.gather(1, ranked), positions)  # invalid sort last
    chosen = ranked.sort(dim=1).values  # [B, picks], position order
    chosen = chosen.masked_fill(chosen == positions, -1)
    if picks < k:
        chosen = torch.cat([chosen, chosen.new_full((batch, k - picks), -1)], dim=1)
    return chosen


def temperature_at(step: int, total_steps: int, start: float = 1.0, end: float = 0.1) -> float:
    """Linear annealing: ``start`` at step 0, ``end`` at step ``total_steps - 1`` and after."""
    frac = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return start + (end - start) * frac


def valid_length(pool_size: int, round_: int | torch.Tensor) -> int | torch.Tensor:
    """k_r = ceil(N / (r + 1)): pool positions 0..k_r-1 are eligible in round r (0-based).

    ``round_`` is one round or a tensor of rounds (integer arithmetic: exact for both)."""
    return (pool_size + round_) // (round_ + 1)


def selectable_mask(
    rounds: torch.Tensor, pool_size: int, pool_len: int | None = None
) -> torch.Tensor:
    """Which of pool positions 1..L-1 the selector may pick (column j = pool position j+1).

    rounds: [B] 0-based dialogue rounds; pool_size: N of the config, which fixes k_r;
    pool_len: L, the pools' actual length (shorter than N when the gallery is). [B, L-1] bool.
    """
    pool_len = pool_size if pool_len is None else pool_len
    k = valid_length(pool_size, rounds.long())  # [B]
    positions = torch.arange(1, pool_len, device=rounds.device)  # [L-1]
    return positions.unsqueeze(0) < k.unsqueeze(1)


def candidate_positions(selected: torch.Tensor) -> torch.Tensor:
    """Pool positions shown to the questioner: the top-1 then the selected ones, rank order.

    selected: [B, c] from ``topk_positions`` (columns of a ``selectable_mask``, so pool
    position = column + 1; -1 = none). Returns [B, 1 + c] pool positions (-1 kept).
    """
    shifted = torch.where(selected >= 0, selected + 1, selected)
    return torch.cat([torch.zeros_like(selected[:, :1]), shifted], dim=1)
