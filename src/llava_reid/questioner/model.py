"""The questioner: a transformers LLaVA-OneVision loaded from a local folder, fed by our own
multi-image token layout.

A prompt (llava_reid.questioner.prompts.PromptParts) is tokenised piece by piece; each image
slot becomes a run of ``image_token_id`` placeholders as long as that image's visual tokens
(llava_reid.questioner.vision), and the placeholders are replaced by the tokens of exactly the
images given for that row, in order, each once (``splice_images``). The ids that were spliced
are returned with every batch so callers can record what the questioner actually saw.

Training computes logits only at the target positions (a 152k-token vocabulary times a
600-token prompt would otherwise dominate memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

from llava_reid.artifacts import reading
from llava_reid.questioner.prompts import IM_END, PromptParts, assistant_turn
from llava_reid.questioner.vision import VisionPreprocessor, visual_tokens
from llava_reid.runtime import default_dtype, resolve_device

log = logging.getLogger(__name__)


def attention_implementation(device: torch.device) -> str:
    """flash-attn 2 when installed and on CUDA, else PyTorch SDPA."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


@dataclass
class Batch:
    """Model inputs for a batch of prompts (and targets, in training)."""

    input_ids: torch.Tensor  # [B, L], image slots hold image_token_id placeholders
    image_tokens: list[list[torch.Tensor]]  # per row, its images' visual tokens, in order
    attention_mask: torch.Tensor  # [B, L] 1 = token, 0 = padding
    position_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor | None  # [B, L] next-token targets at each position, -100 elsewhere
    seen: list[list[int]]  # image ids spliced into each row, in order


class Questioner:
    """LLaVA-OneVision + tokenizer + our image layout. ``net`` may carry LoRA layers (peft)."""

    def __init__(self, net, tokenizer, qcfg: dict, device: torch.device):
        self.net = net
        self.tokenizer = tokenizer
        self.device = device
        self.pool_ratio = float(qcfg["pool_ratio"])
        vision = net.config.vision_config
        self.preprocess = VisionPreprocessor(vision.image_size, qcfg["image_mean"],
                                             qcfg["image_std"])
        self.image_token_id = int(net.config.image_token_id)
        self.im_end_id = self._single_id(IM_END)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stops = {self.im_end_id}
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        self.stop_ids = sorted(stops)
        self._piece_cache: dict[str, list[int]] = {}

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        qcfg: dict,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
    ) -> Questioner:
        """Load an HF-format LLaVA-OneVision folder (the 7B checkpoint or the tiny factory's)."""
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder}: not a LLaVA-OneVision model folder (no config.json)")
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        with reading(folder, "the questioner"):
            net = LlavaOnevisionForConditionalGeneration.from_pretrained(
                str(folder),
                dtype=dtype or default_dtype(dev),
                use_safetensors=True,
                attn_implementation=attention_implementation(dev),
            )
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(net.to(dev).eval(), tokenizer, qcfg, dev)

    def load_adapter(self, adapter: str | Path, trainable: bool = False, merge: bool = False):
        """Attach a PEFT LoRA adapter (and any modules it saved, e.g. the projector)."""
        from peft import PeftModel

        with reading(adapter, "the questioner's LoRA adapter"):
            peft_model = PeftModel.from_pretrained(self.net, str(adapter), is_trainable=trainable)
        self.net = peft_model.merge_and_unload() if merge else peft_model
        return self.net

    def compile_vision_tower(self) -> None:
        """On CUDA, torch.compile the vision tower: its element-wise work, fused, no longer
        dominates (bench/RESULTS.md, "Gallery encoding"). No-op on CPU."""
        if self.device.type == "cuda":
            self.base.model.vision_tower.compile()

    def fuse_language_model(self) -> int:
        """On CUDA, fuse the language model's RMSNorm and SiLU-gate element-wise work
        (llava_reid.questioner.fused; inference only). Returns the modules swapped."""
        if self.device.type != "cuda":
            return 0
        from llava_reid.questioner.fused import fuse_pointwise

        return fuse_pointwise(self.base.model.language_model)

    @property
    def base(self) -> LlavaOnevisionForConditionalGeneration:
        """The LLaVA-OneVision module (inside the PEFT wrapper when there is one)."""
        net = self.net
        if hasattr(net, "get_base_model"):
            net = net.get_base_model()
        return net

    def _single_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids(token)
        if ids is None or ids == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token!r} token (ChatML needed)")
        return int(ids)

    # -- images ------------------------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: cached tokens are later weighted under autograd
    def encode_images(self, images) -> list[torch.Tensor]:
        """PIL images -> their visual tokens, each [T_i, D] (on the model's device/dtype)."""
        pixels, sizes = self.preprocess.batch(images)
        dtype = next(self.base.model.vision_tower.parameters()).dtype
        return visual_tokens(self.base, pixels.to(self.device, dtype), sizes, self.pool_ratio)

    # -- text --------------------------------------------------------------------------------

    def piece_ids(self, text: str) -> list[int]:
        """Token ids of one text piece (no special tokens added; ChatML markers are tokens)."""
        ids = self._piece_cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._piece_cache) < 50_000:
                self._piece_cache[text] = ids
        return ids

    def prefix_ids(self, prompt: PromptParts) -> list[int]:
        """The shared prefix of the prompt's template (tokenised on its own, always)."""
        return self.piece_ids(prompt.texts[0][: prompt.prefix_len])

    def prompt_ids(self, prompt: PromptParts, image_lengths: Sequence[int]) -> list[int]:
        """Ids after the shared prefix, with ``image_lengths[i]`` placeholders per image."""
        if len(image_lengths) != prompt.num_images:
            raise ValueError(
                f"prompt has {prompt.num_images} image slots, got {len(image_lengths)} images"
            )
        ids = list(self.piece_ids(prompt.texts[0][prompt.prefix_len :]))
        for n, text in zip(image_lengths, prompt.texts[1:], strict=True):
            ids += [self.image_token_id] * int(n)
            ids += self.piece_ids(text)
        return ids

    def target_ids(self, question: str) -> list[int]:
        return self.piece_ids(assistant_turn(question))

    # -- batches -----------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(ids)

    def training_batch(
        self,
        prompts: Sequence[PromptParts],
        image_ids: Sequence[Sequence[int]],
        image_tokens: Sequence[Sequence[torch.Tensor]],
        targets: Sequence[str],
    ) -> Batch:
        """Full sequences (prefix + prompt + question), right-padded; labels on the question
        and its end-of-turn token only."""
        rows, label_rows = [], []
        for prompt, toks, target in zip(prompts, image_tokens, targets, strict=True):
            head = self.prefix_ids(prompt) + self.prompt_ids(prompt, [len(t) for t in toks])
            tail = self.target_ids(target)
            rows.append(head + tail)
            # labels[j] = the token at j + 1 when that token is part of the answer.
            label_rows.append([-100] * (len(head) - 1) + tail + [-100])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(r)] = 1
        ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        return Batch(ids, [list(t) for t in image_tokens], mask, positions, labels,
                     [list(x) for x in image_ids])

    def inputs_embeds(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with every row's visual tokens spliced into its image slots."""
        ids = batch.input_ids
        return splice_images(self.embed(ids), ids, self.image_token_id, batch.image_tokens)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled (question) positions."""
        hidden = self.base.model.language_model(
            inputs_embeds=self.inputs_embeds(batch),
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        where = batch.labels != -100
        logits = self.base.lm_head(hidden[where])
        return F.cross_entropy(logits.float(), batch.labels[where])


def splice_images(
    embeds: torch.Tensor,
    ids: torch.Tensor,
    image_token_id: int,
    image_tokens: Sequence[Sequence[torch.Tensor]],
) -> torch.Tensor:
    """Replace each row's placeholder positions by its images' tokens, in order, each once.

    ``embeds`` [B, L, D] are the token embeddings of ``ids`` [B, L]; ``image_tokens[b]`` lists
    row b's images, each [T, D]. The number of placeholders of a row must equal the total
    number of its visual tokens. Gradients flow into the image tokens (joint training weights
    them by the selector's k-hot)."""
    mask = ids == image_token_id
    pieces = []
    for b, toks in enumerate(image_tokens):
        want = int(mask[b].sum())
        have = sum(int(t.shape[0]) for t in toks)
        if want != have:
            raise ValueError(f"row {b}: {want} image placeholders but {have} visual tokens")
        if toks:
            pieces.append(torch.cat([t.to(embeds.dtype) for t in toks]))
    if not pieces:
        return embeds
    source = torch.cat(pieces).to(embeds.device)
    return embeds.masked_scatter(mask.unsqueeze(-1), source)
