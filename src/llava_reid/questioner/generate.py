"""Batched question generation with a shared prompt prefix and per-row seeded sampling.

All active dialogues of a batch are generated together:

1. the shared prefix of each prompt template (system message + preamble; see
   llava_reid.questioner.prompts) is run once, and its KV cache is repeated over the rows that
   use that template;
2. each row's own part (images, dialogue, instruction) is prefilled after it, longest rows
   first, in blocks padded to their own longest row. Padding sits BETWEEN the prefix and a
   row's own tokens, so the prefix stays at positions 0..P-1 for every row, each row's tokens
   keep consecutive positions, and every row's prompt ends at the same cache slot;
3. decoding runs in lockstep into a fixed-slot KV cache until every row has emitted an
   end-of-turn token; on CUDA each step replays one captured CUDA graph.

Sampling is top-p (nucleus) over the softmax, drawn with the Gumbel-max trick from noise that
is a hash of (row seed, step, token id): a row's question depends on its own seed only, never
on which other rows share its batch, so evaluation chunked 1 or N ways gives the same
dialogues.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache as memoize
from inspect import signature

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from llava_reid.questioner.model import Questioner, splice_images
from llava_reid.questioner.prompts import PromptParts, clean_question

_MASK31 = 0x7FFFFFFF


@memoize
def _cache_keyword(forward_cls: type) -> str:
    """The forward keyword that takes the KV cache: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); older releases take
    only the old name."""
    return "cache" if "cache" in signature(forward_cls.forward).parameters else "past_key_values"


def _with_cache(lm: torch.nn.Module, cache: Cache) -> dict[str, Cache]:
    return {_cache_keyword(type(lm)): cache}


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48
    min_new_tokens: int = 1  # end-of-turn is suppressed before this many tokens
    do_sample: bool = True
    top_p: float = 0.5
    temperature: float = 1.0
    cuda_graphs: bool = True  # on CUDA, replay each decode step as one captured graph


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


@dataclass
class WritePlan:
    """Where the next forward pass writes its keys/values, shared by every cache layer.

    Prefill: rows ``rows`` of the batch, slots ``start ..`` (one slot per input token).
    Decode: one token per row, written at the slot held by the device tensor ``slot``, so
    that a CUDA graph captured once replays every step with the slot advanced in place."""

    rows: slice = field(default_factory=lambda: slice(None))
    start: int = 0
    slot: torch.Tensor | None = None


class SlotLayer(DynamicLayer):
    """One layer's KV cache in fixed [B, kv_heads, capacity, head_dim] buffers.

    Nothing is ever reallocated or concatenated: prefill writes a block of slots for a block
    of rows and attends over the slots before it; decode writes one slot (``index_copy_``)
    and attends over the whole buffer, the explicit attention mask hiding empty slots. Fixed
    shapes and addresses are what lets decode run as one replayed CUDA graph."""

    def __init__(self, plan: WritePlan, shape: tuple[int, int, int, int], dtype, device):
        super().__init__()
        self.plan = plan
        self.dtype, self.device = dtype, device
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        plan = self.plan
        if plan.slot is not None:
            self.keys.index_copy_(2, plan.slot, key_states)
            self.values.index_copy_(2, plan.slot, value_states)
            return self.keys, self.values
        end = plan.start + key_states.shape[-2]
        if end > self.keys.shape[2]:
            raise RuntimeError(f"KV cache full: writing slots {plan.start}..{end} of "
                               f"{self.keys.shape[2]}")
        self.keys[plan.rows, :, plan.start : end] = key_states
        self.values[plan.rows, :, plan.start : end] = value_states
        return self.keys[plan.rows, :, :end], self.values[plan.rows, :, :end]

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0


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
            lm = self.q.base.model.language_model
            lm(
                inputs_embeds=self.q.embed(t), **_with_cache(lm, cache), use_cache=True,
                position_ids=torch.arange(len(ids), device=self.q.device)[None],
            )
            self._kv[key] = cache
        return self._kv[key]

    def batch_cache(self, prefixes: Sequence[tuple[int, ...]], capacity: int,
                    plan: WritePlan | None = None) -> tuple[Cache, torch.Tensor]:
        """A ``capacity``-slot cache for a batch whose row i starts with ``prefixes[i]``:
        each prefix's KV is right-aligned in the first ``max(len)`` slots (shorter ones start
        later), and the matching [B, max(len)] mask of filled slots."""
        plan = plan or WritePlan()
        width = max(len(p) for p in prefixes)
        rows_of: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prefixes):
            rows_of.setdefault(tuple(p), []).append(i)
        layers = []
        for layer_idx in range(self.q.base.config.text_config.num_hidden_layers):
            ref = self.get(next(iter(rows_of))).layers[layer_idx].keys
            layer = SlotLayer(plan, (len(prefixes), ref.shape[1], capacity, ref.shape[3]),
                              ref.dtype, ref.device)
            for prefix, rows in rows_of.items():
                src = self.get(prefix).layers[layer_idx]
                index = torch.tensor(rows, device=ref.device)
                layer.keys[index, :, width - len(prefix) : width] = src.keys
                layer.values[index, :, width - len(prefix) : width] = src.values
            layers.append(layer)
        mask = torch.zeros((len(prefixes), width), dtype=torch.bool, device=self.q.device)
        for prefix, rows in rows_of.items():
            mask[torch.tensor(rows, device=mask.device), width - len(prefix) :] = True
        return Cache(layers=layers), mask


PREFILL_TOKENS = 32_768  # padded prompt tokens per prefill pass (bounds activation memory)


@dataclass
class GenerationResult:
    questions: list[str]  # per prompt, its first sample
    seen: list[list[int]]  # per prompt, the image ids whose tokens were spliced, in order
    samples: list[list[str]] = field(default_factory=list)  # per prompt, every sample


def sample_seed(seed: int, k: int) -> int:
    """The seed of a prompt's k-th sample (the 0th keeps the prompt's own seed)."""
    return seed if k == 0 else (seed * 1_000_003 + k * 7_919) & _MASK31


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
    prefill_tokens: int | None = None,
    samples: int = 1,
) -> GenerationResult:
    """``samples`` questions per prompt (seeds: :func:`sample_seed`); ``image_ids[i]`` are
    prompt i's images in slot order and ``token_source(ids)`` returns their visual tokens
    (the cache). Prompts are generated in batches of ``batch_size``, whatever their
    templates; each batch is prefilled in passes of about ``prefill_tokens`` padded tokens,
    once for all the samples of a prompt."""
    prefix_cache = prefix_cache or PrefixCache(questioner)
    drawn: list[list[str]] = []
    seen: list[list[int]] = []
    with _sdpa_attention(questioner.base.model.language_model):
        for s in range(0, len(prompts), batch_size):
            rows = range(s, min(s + batch_size, len(prompts)))
            tokens = [token_source(image_ids[i]) for i in rows]
            drawn += _generate_batch(questioner, [prompts[i] for i in rows], tokens,
                                     [seeds[i] for i in rows], cfg, prefix_cache,
                                     prefill_tokens or PREFILL_TOKENS, samples)
            seen += [[int(x) for x in image_ids[i]] for i in rows]
    return GenerationResult([d[0] for d in drawn], seen, drawn)


def _generate_batch(q: Questioner, prompts, image_tokens, seeds, cfg,
                    prefix_cache: PrefixCache, prefill_tokens: int = PREFILL_TOKENS,
                    samples: int = 1) -> list[list[str]]:
    """Cache slots per row: [pad][its template's prefix][pad][its own tokens][generated].

    Rows are processed longest body first, so each prefill pass pads its rows only to the
    longest body among them; all rows share the slot where bodies end, so decoding writes
    every row's new token into the same slot. For ``samples`` > 1 each row's prefilled cache
    is copied to that many decoding rows, which differ only in their seeds."""
    device = q.device
    bodies = [q.prompt_ids(p, [len(t) for t in toks])
              for p, toks in zip(prompts, image_tokens, strict=True)]
    order = sorted(range(len(prompts)), key=lambda i: -len(bodies[i]))
    prompts, bodies = [prompts[i] for i in order], [bodies[i] for i in order]
    image_tokens = [image_tokens[i] for i in order]
    prefixes = [tuple(q.prefix_ids(p)) for p in prompts]
    bsz, width, prefix_width = len(prompts), len(bodies[0]), max(map(len, prefixes))
    body_end = prefix_width + width
    # Capacity rounded up to 16 slots: SDPA's memory-efficient kernel wants aligned masks.
    capacity = -(-(body_end + cfg.max_new_tokens) // 16) * 16
    plan = WritePlan()
    cache, prefix_mask = prefix_cache.batch_cache(prefixes, capacity, plan)
    visible = torch.zeros((bsz, capacity), dtype=torch.bool, device=device)
    visible[:, :prefix_width] = prefix_mask
    prefix_lens = torch.tensor([len(p) for p in prefixes], device=device)
    body_lens = torch.tensor([len(b) for b in bodies], device=device)
    lm, head = q.base.model.language_model, q.base.lm_head

    last_logits, start = [], 0
    while start < bsz:  # prefill, a block of rows at a time
        w = len(bodies[start])
        stop = min(bsz, start + max(1, prefill_tokens // w))
        rows = slice(start, stop)
        ids = torch.full((stop - start, w), q.pad_id, dtype=torch.long)
        for i in range(start, stop):  # each body right-aligned, ending at body_end
            ids[i - start, w - len(bodies[i]) :] = torch.tensor(bodies[i])
        ids = ids.to(device)
        first = body_end - w  # the block's first slot
        real = torch.arange(w, device=device)[None] >= (w - body_lens[rows])[:, None]
        visible[rows, first:body_end] = real
        causal = torch.ones((w, w), dtype=torch.bool, device=device).tril()
        mask = visible[rows, None, None, :body_end].repeat(1, 1, w, 1)
        mask[:, 0, :, first:] &= causal
        positions = (prefix_lens[rows, None] + real.long().cumsum(1) - 1).clamp_min(0)
        embeds = splice_images(q.embed(ids), ids, q.image_token_id, image_tokens[rows])
        plan.rows, plan.start = rows, first
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                    **_with_cache(lm, cache), use_cache=True).last_hidden_state
        last_logits.append(head(hidden[:, -1]))
        start = stop
    logits = torch.cat(last_logits)
    if samples > 1:  # row r's samples are rows r * samples .. r * samples + samples - 1
        for layer in cache.layers:
            layer.keys = layer.keys.repeat_interleave(samples, 0)
            layer.values = layer.values.repeat_interleave(samples, 0)
        visible = visible.repeat_interleave(samples, 0)
        prefix_lens = prefix_lens.repeat_interleave(samples)
        body_lens = body_lens.repeat_interleave(samples)
        logits = logits.repeat_interleave(samples, 0)
        bsz *= samples

    # Decode: fixed-address inputs, advanced in place, so the step can be a CUDA graph.
    plan.rows, plan.slot = slice(None), torch.tensor([body_end], device=device)
    token_in = torch.zeros(bsz, dtype=torch.long, device=device)
    position = prefix_lens + body_lens  # the next token's position, per row

    def decode_step() -> torch.Tensor:
        visible.index_fill_(1, plan.slot, True)
        hidden = lm(inputs_embeds=q.embed(token_in[:, None]),
                    attention_mask=visible[:, None, None, :], position_ids=position[:, None],
                    **_with_cache(lm, cache), use_cache=True).last_hidden_state
        return head(hidden[:, -1])

    step_fn = _GraphedStep(decode_step) if device.type == "cuda" and cfg.cuda_graphs \
        else decode_step
    seed_t = torch.tensor([sample_seed(seeds[i], k) for i in order for k in range(samples)],
                          dtype=torch.int64, device=device)
    stops = torch.tensor(q.stop_ids, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
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
        token_in.copy_(token)
        if step > 0:
            position += 1
            plan.slot += 1
        logits = step_fn()

    tokens = torch.stack(generated, 1).cpu().tolist()
    texts: list[list[str]] = [[] for _ in order]
    for n, row in enumerate(tokens):
        cut = row
        for j, t in enumerate(row):
            if t in q.stop_ids:
                cut = row[:j]
                break
        texts[order[n // samples]].append(
            clean_question(q.tokenizer.decode(cut, skip_special_tokens=True)))
    return texts


class _GraphedStep:
    """Runs ``fn`` eagerly once (warming kernels and the allocator), captures it as a CUDA
    graph, and replays the graph afterwards: decode at batch 256 is otherwise bound by
    launching ~30 kernels per layer per token."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn, self.graph, self.out = fn, None, None

    def __call__(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the step; executes nothing
            self.out = self.fn()
        return out


@contextmanager
def _sdpa_attention(lm):
    """Generation passes explicit boolean 4D masks, which the SDPA path reads as given;
    flash-attn 2 (padding masks only) is swapped for SDPA while generating."""
    config = lm.config
    before = config._attn_implementation
    if before != "sdpa":
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        if before != "sdpa":
            config._attn_implementation = before
