"""IRRA's training objectives: SDM, ID and cross-modal MLM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdm_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    image_pids: torch.Tensor,
    text_pids: torch.Tensor,
    temperature: float,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Similarity distribution matching.

    For each text, the softmax over its similarities to the batch's images is pulled towards
    the uniform distribution over the images of the same identity (KL(p || q)), and the same
    from each image to the texts. ``image_feats``/``text_feats`` may include features gathered
    from other processes (rows with no gradient); every text row is an anchor.
    """
    img = F.normalize(image_feats, dim=-1)
    txt = F.normalize(text_feats, dim=-1)
    logits_t2i = txt @ img.t() / temperature
    match = (text_pids[:, None] == image_pids[None, :]).float()
    target_t2i = match / match.sum(dim=1, keepdim=True).clamp_min(1.0)
    target_i2t = match.t() / match.t().sum(dim=1, keepdim=True).clamp_min(1.0)

    def kl(logits, target):
        p = logits.softmax(dim=1)
        return (p * (logits.log_softmax(dim=1) - torch.log(target + eps))).sum(dim=1).mean()

    return kl(logits_t2i, target_t2i) + kl(logits_t2i.t(), target_i2t)


def id_loss(
    classifier: torch.nn.Module,
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    class_ids: torch.Tensor,
) -> torch.Tensor:
    """Identity classification with one classifier shared by both towers, averaged."""
    return 0.5 * (
        F.cross_entropy(classifier(image_feats), class_ids)
        + F.cross_entropy(classifier(text_feats), class_ids)
    )


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: list[int],
    prob: float,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of non-special tokens: of the chosen ``prob`` fraction, 80 % become
    the mask token, 10 % a random token, 10 % stay. Returns (masked ids, labels with -100 on
    unchosen positions). Every row gets at least one chosen token."""
    ids = input_ids.clone()
    cpu_ids = input_ids.cpu()
    candidates = attention_mask.cpu().bool()
    for sid in special_ids:
        candidates &= cpu_ids != sid
    draw = torch.rand(ids.shape, generator=g)
    chosen = (draw < prob) & candidates
    # Guarantee one prediction per row that has any maskable token.
    none = ~chosen.any(dim=1) & candidates.any(dim=1)
    if none.any():
        scores = torch.where(candidates, draw, torch.full_like(draw, 2.0))
        first = scores.argmin(dim=1)
        chosen[none, first[none]] = True
    action = torch.rand(ids.shape, generator=g)
    random_tokens = torch.randint(0, vocab_size, ids.shape, generator=g)
    labels = torch.where(chosen, cpu_ids, torch.full_like(cpu_ids, -100))
    new = cpu_ids.clone()
    new[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    new[swap] = random_tokens[swap]
    return new.to(ids.device), labels.to(ids.device)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
