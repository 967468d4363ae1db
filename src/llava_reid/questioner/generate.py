"""Batched question generation with a shared prompt prefix and per-row seeded sampling.

All active dialogues of a batch are generated together:

1. the shared prefix of each prompt template (system message + preamble; see
   llava_reid.questioner.prompts) is run once, and its KV cache is repeated over the rows that
   use that template;
2. each row's own part (images, dialogue, instruction) is prefilled after it. Rows of
   different lengths are padded BETWEEN the prefix and their own tokens, so the prefix stays
   at positions 0..P-1 for every row and each row's tokens keep consecutive positions;
3. decoding runs in lockstep until every row has emitted an end-of-turn token.

Sampling is top-p (nucleus) over the softmax, drawn with the Gumbel-max trick from noise that
is a hash of (row seed, step, token id): a row's question depends on its own seed only, never
on which other rows share its batch, so evaluation chunked 1 or N ways gives the same
dialogues.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from llava_reid.questioner.model import Questioner, splice_images
from llava_reid.questioner.prompts import PromptParts, clean_question

_MASK31 = 0x7FFFFFFF


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48
    do_sample: bool = True
    top_p: float = 0.5
    temperature: float = 1.0


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (LCG rounds + xorshift); int64 arithmetic never overflows."""
    for _ in range(3):
        x = (x * 1103515245 + 12345) & _MASK31
        x = x ^ (x >> 13)
    return x


def hashed_uniform(seeds: torch.Tensor, step: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise [B, K] determined by (row seed, step, token id) alone."""
    s = _mix((seeds.to(torch.int64) & _MASK31) + 1)
    s = _mix((s + step * 7919) & _MASK31)
    x = _mix((s[:, None] ^ ((token_ids.to(torch.int64) * 2654435) & _MASK31)) & _MASK31)
    return (x.to(torch.float64) + 0.5) / float(_MASK31 + 1)


NUCLEUS_CAP = 256  # the nucleus is looked for among the 256 likeliest tokens


def choose_tokens(logits: torch.Tensor, cfg: GenerationConfig, seeds: torch.Tensor,
                  step: int) -> torch.Tensor:
    """Greedy, or top-p sampling with per-row hashed Gumbel noise. logits [B, V] -> [B]."""
    logits = logits.float()
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(cfg.temperature, 1e-5)
    top, ids = logits.topk(min(NUCLEUS_CAP, logits.shape[-1]), dim=-1)  # sorted, descending
    probs = logits.softmax(dim=-1).gather(-1, ids)
    # Keep the smallest set whose mass reaches top_p (the likeliest token always stays).
    keep = (probs.cumsum(dim=-1) - probs) < cfg.top_p
    gumbel = -torch.log(-torch.log(hashed_uniform(seeds, step, ids))).to(top.dtype)
    scores = torch.where(keep, top + gumbel, torch.full_like(top, -torch.inf))
    return ids.gather(-1, scores.argmax(dim=-1, keepdim=True)).squeeze(-1)


class PrefixCache:
    """KV of each template's shared prefix, computed once per questioner weights."""

    def __init__(self, questioner: Questioner):
        self.q = questioner
        self._kv: dict[tuple[int, ...], DynamicCache] = {}

    @torch.inference_mode()
    def get(self, ids: Sequence[int]) -> DynamicCache:
        key = tuple(ids)
        if key not in self._kv:
            t = torch.tensor([list(ids)], device=self.q.device)
            cache = DynamicCache(config=self.q.base.config.text_config)
            self.q.base.model.language_model(
                inputs_embeds=self.q.embed(t), past_key_values=cache, use_cache=True,
                position_ids=torch.arange(len(ids), device=self.q.device)[None],
            )
            self._kv[key] = cache
        return self._kv[key]

    def expanded(self, ids: Sequence[int], rows: int) -> DynamicCache:
        """A copy of the prefix KV repeated for ``rows`` rows (the original stays intact)."""
        src = self.get(ids)
        cache = DynamicCache(config=self.q.base.config.text_config)
        for layer_idx, layer in enumerate(src.layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1).contiguous(),
                         layer.values.expand(rows, -1, -1, -1).contiguous(), layer_idx)
        return cache


@dataclass
class GenerationResult:
    questions: list[str]
    seen: list[list[int]]  # per prompt, the image ids whose tokens were spliced, in order


@torch.inference_mode()
def generate_questions(
    questioner: Questioner,
    prompts: Sequence[PromptParts],
    image_ids: Sequence[Sequence[int]],
    token_source: Callable[[Sequence[int]], list[torch.Tensor]],
    seeds: Sequence[int],
    cfg: GenerationConfig,
    prefix_cache: PrefixCache | None = None,
    batch_size: int = 64,
) -> GenerationResult:
    """One question per prompt; ``image_ids[i]`` are prompt i's images in slot order and
    ``token_source(ids)`` returns their visual tokens (the cache). Rows are grouped by template
    (shared prefix), then batched."""
    prefix_cache = prefix_cache or PrefixCache(questioner)
    questions: list[str] = [""] * len(prompts)
    seen: list[list[int]] = [[] for _ in prompts]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(questioner.prefix_ids(p)), []).append(i)
    for prefix, members in groups.items():
        for s in range(0, len(members), batch_size):
            rows = members[s : s + batch_size]
            tokens = [token_source(image_ids[i]) for i in rows]
            texts = _generate_group(
                questioner, list(prefix), [prompts[i] for i in rows], tokens,
                [seeds[i] for i in rows], cfg, prefix_cache,
            )
            for i, text in zip(rows, texts, strict=True):
                questions[i] = text
                seen[i] = [int(x) for x in image_ids[i]]
    return GenerationResult(questions, seen)


def _generate_group(q: Questioner, prefix: list[int], prompts, image_tokens, seeds, cfg,
                    prefix_cache: PrefixCache) -> list[str]:
    device = q.device
    bsz, p_len = len(prompts), len(prefix)
    bodies = [q.prompt_ids(p, [len(t) for t in toks])
              for p, toks in zip(prompts, image_tokens, strict=True)]
    width = max(len(b) for b in bodies)
    ids = torch.full((bsz, width), q.pad_id, dtype=torch.long)
    body_mask = torch.zeros((bsz, width), dtype=torch.long)
    for i, body in enumerate(bodies):  # padding sits between the prefix and the body
        ids[i, width - len(body) :] = torch.tensor(body)
        body_mask[i, width - len(body) :] = 1
    ids, body_mask = ids.to(device), body_mask.to(device)
    embeds = splice_images(q.embed(ids), ids, q.image_token_id, image_tokens)
    mask = torch.cat([torch.ones((bsz, p_len), dtype=torch.long, device=device), body_mask], 1)
    positions = (p_len + body_mask.cumsum(1) - 1).clamp_min(p_len)
    cache = prefix_cache.expanded(prefix, bsz)
    lm, head = q.base.model.language_model, q.base.lm_head
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True).last_hidden_state
    logits = head(hidden[:, -1])
    next_pos = positions[:, -1] + 1
    seed_t = torch.tensor(list(seeds), dtype=torch.int64, device=device)
    stops = torch.tensor(q.stop_ids, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for step in range(cfg.max_new_tokens):
        if step == 0:  # never end before the first word
            logits = logits.clone()
            logits[:, stops] = -torch.inf
        token = choose_tokens(logits, cfg, seed_t, step)
        token = torch.where(done, torch.full_like(token, q.pad_id), token)
        generated.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((bsz, 1), dtype=torch.long, device=device)], 1)
        hidden = lm(inputs_embeds=q.embed(token[:, None]), attention_mask=mask,
                    position_ids=next_pos[:, None], past_key_values=cache,
                    use_cache=True).last_hidden_state
        logits = head(hidden[:, -1])
        next_pos = next_pos + 1
    tokens = torch.stack(generated, 1).cpu().tolist()
    texts = []
    for row in tokens:
        cut = row
        for j, t in enumerate(row):
            if t in q.stop_ids:
                cut = row[:j]
                break
        texts.append(clean_question(q.tokenizer.decode(cut, skip_special_tokens=True)))
    return texts
