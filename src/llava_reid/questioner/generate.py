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
from transformers.cache_utils import Cache, DynamicLayer

from llava_reid.questioner.model import Questioner, splice_images
from llava_reid.questioner.prompts import PromptParts, clean_question

_MASK31 = 0x7FFFFFFF


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48
    min_new_tokens: int = 1  # end-of-turn is suppressed before this many tokens
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


class PreallocatedLayer(DynamicLayer):
    """A KV cache layer written in place into buffers sized for the whole generation.

    transformers' DynamicLayer concatenates on every decode step, copying the whole cache each
    time; here each step writes one slot and attention reads a view of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = torch.empty((b, h, self.capacity, d), dtype=self.dtype, device=self.device)
        self._v = torch.empty((b, h, self.capacity, value_states.shape[-1]), dtype=self.dtype,
                              device=self.device)
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
        self.is_initialized = True

    @torch.compiler.disable  # a Python-side write; keeps compiled layers free of length guards
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {n} > {self.capacity}")
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


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

    def batch_cache(self, prefixes: Sequence[tuple[int, ...]], capacity: int
                    ) -> tuple[Cache, torch.Tensor]:
        """A cache for a batch whose row i starts with ``prefixes[i]``: each prefix's KV is
        right-aligned in the first ``max(len)`` slots (shorter ones padded on the left), and
        the matching [B, max(len)] attention mask."""
        width = max(len(p) for p in prefixes)
        rows_of: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prefixes):
            rows_of.setdefault(tuple(p), []).append(i)
        layers = self.q.base.config.text_config.num_hidden_layers
        cache = Cache(layers=[PreallocatedLayer(capacity) for _ in range(layers)])
        mask = torch.zeros((len(prefixes), width), dtype=torch.long, device=self.q.device)
        for layer_idx in range(layers):
            ref = self.get(next(iter(rows_of))).layers[layer_idx].keys
            shape = (len(prefixes), ref.shape[1], width, ref.shape[3])
            keys = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            values = torch.zeros_like(keys)
            for prefix, rows in rows_of.items():
                src = self.get(prefix).layers[layer_idx]
                index = torch.tensor(rows, device=ref.device)
                keys[index, :, width - len(prefix) :] = src.keys
                values[index, :, width - len(prefix) :] = src.values
            cache.update(keys, values, layer_idx)
        for prefix, rows in rows_of.items():
            mask[torch.tensor(rows, device=mask.device), width - len(prefix) :] = 1
        return cache, mask


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
    ``token_source(ids)`` returns their visual tokens (the cache). Prompts are generated in
    batches of ``batch_size``, whatever their templates."""
    prefix_cache = prefix_cache or PrefixCache(questioner)
    questions: list[str] = []
    seen: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        rows = range(s, min(s + batch_size, len(prompts)))
        tokens = [token_source(image_ids[i]) for i in rows]
        questions += _generate_batch(questioner, [prompts[i] for i in rows], tokens,
                                     [seeds[i] for i in rows], cfg, prefix_cache)
        seen += [[int(x) for x in image_ids[i]] for i in rows]
    return GenerationResult(questions, seen)


def _generate_batch(q: Questioner, prompts, image_tokens, seeds, cfg,
                    prefix_cache: PrefixCache) -> list[str]:
    """Layout per row: [pad][its template's prefix][pad][its own tokens][generated]."""
    device = q.device
    bsz = len(prompts)
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
    prefixes = [tuple(q.prefix_ids(p)) for p in prompts]
    prefix_lens = torch.tensor([len(p) for p in prefixes], device=device)
    cache, prefix_mask = prefix_cache.batch_cache(
        prefixes, max(map(len, prefixes)) + width + cfg.max_new_tokens)
    mask = torch.cat([prefix_mask, body_mask], 1)
    positions = (prefix_lens[:, None] + body_mask.cumsum(1) - 1).clamp_min(0)
    lm, head = q.base.model.language_model, q.base.lm_head
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True).last_hidden_state
    logits = head(hidden[:, -1])
    next_pos = positions[:, -1] + 1
    seed_t = torch.tensor(list(seeds), dtype=torch.int64, device=device)
    stops = torch.tensor(q.stop_ids, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    full_mask = torch.ones((bsz, mask.shape[1] + cfg.max_new_tokens), dtype=torch.long,
                           device=device)
    full_mask[:, : mask.shape[1]] = mask
    generated: list[torch.Tensor] = []
    for step in range(cfg.max_new_tokens):
        if step < cfg.min_new_tokens:  # never end before the first word
            logits = logits.clone()
            logits[:, stops] = -torch.inf
        token = choose_tokens(logits, cfg, seed_t, step)
        token = torch.where(done, torch.full_like(token, q.pad_id), token)
        generated.append(token)
        done |= torch.isin(token, stops)
        if step == cfg.max_new_tokens - 1 or bool(done.all()):
            break
        hidden = lm(inputs_embeds=q.embed(token[:, None]),
                    attention_mask=full_mask[:, : mask.shape[1] + step + 1],
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
