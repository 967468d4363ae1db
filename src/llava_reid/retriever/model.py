"""The IRRA-style retriever: a CLIP dual encoder (transformers' CLIPModel) plus training heads.

Image feature = projected, post-layer-normed CLS token; text feature = projected EOS token;
similarity = cosine / temperature. The heads exist only for training: an identity classifier
shared by both towers (ID loss) and a cross-modal masked-language-model "cross-former" (MLM
loss: masked text tokens attend to the image tokens). The saved model folder holds the CLIP
weights and tokenizer only (``save_pretrained``); heads go into training checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedTokenizerBase
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from llava_reid.artifacts import ArtifactError, reading

log = logging.getLogger(__name__)


class QueryTokenizer:
    """CLIP-style text encoding: BOS + tokens + EOS, padded to the batch's longest row.

    A text longer than the context keeps its NEWEST tokens (dialogue queries grow at the end)
    and a warning is logged once.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("retriever tokenizer needs bos_token and eos_token")
        self._warned = False

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        body = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        room = self.max_length - 2
        width = min(self.max_length, 2 + max((len(t) for t in body), default=0))
        ids = torch.full((len(body), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(body), width), dtype=torch.long)
        for i, toks in enumerate(body):
            if len(toks) > room:
                if not self._warned:
                    log.warning(
                        "query of %d tokens exceeds the retriever context (%d): keeping the "
                        "newest %d tokens (warned once)",
                        len(toks) + 2,
                        self.max_length,
                        room,
                    )
                    self._warned = True
                toks = toks[-room:]
            row = [self.bos_id, *toks, self.eos_id]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask


class CrossFormer(nn.Module):
    """MLM head: text tokens cross-attend to image tokens, then a small transformer."""

    def __init__(self, width: int, heads: int, layers: int, vocab_size: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, vocab_size)
        )

    def forward(self, text_tokens, image_tokens, text_padding_mask):
        q = self.norm_q(text_tokens)
        kv = self.norm_kv(image_tokens)
        x = self.cross_attn(q, kv, kv, need_weights=False)[0]
        x = self.blocks(x, src_key_padding_mask=text_padding_mask)
        return self.head(self.norm_out(x))


class Retriever(nn.Module):
    """CLIP dual encoder + the ID classifier and MLM cross-former used in training."""

    def __init__(
        self,
        clip: CLIPModel,
        num_classes: int,
        mlm_layers: int = 1,
        temperature: float = 0.02,
        with_mlm: bool = True,
        image_pooling: str = "cls",
    ):
        super().__init__()
        if image_pooling not in ("cls", "mean"):
            raise ValueError(f"image_pooling must be 'cls' or 'mean', got {image_pooling!r}")
        self.clip = clip
        self.temperature = temperature
        self.image_pooling = image_pooling
        dim = clip.config.projection_dim
        self.classifier = nn.Linear(dim, num_classes) if num_classes > 0 else None
        heads = max(1, dim // 64)
        vocab = clip.config.text_config.vocab_size
        self.cross_former = CrossFormer(dim, heads, mlm_layers, vocab) if with_mlm else None
        for head in (self.classifier, self.cross_former):
            if head is not None:
                head.apply(_init_head)

    @property
    def embed_dim(self) -> int:
        return self.clip.config.projection_dim

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All image tokens in the joint space [B, 1 + patches, D]; token 0 is the CLS."""
        vision = self.clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True)
        hidden = self.clip.vision_model.post_layernorm(vision.last_hidden_state)
        return self.clip.visual_projection(hidden)

    def text_tokens(self, input_ids, attention_mask) -> torch.Tensor:
        """All text tokens in the joint space [B, L, D]."""
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.clip.text_projection(out.last_hidden_state)

    def pool_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image feature: the CLS token (CLIP, IRRA), or the mean of the patch tokens,
        which a tiny tower trained from scratch learns from much sooner."""
        return tokens[:, 0] if self.image_pooling == "cls" else tokens[:, 1:].mean(dim=1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool_image(self.image_tokens(pixel_values))

    def encode_text(self, input_ids, attention_mask) -> torch.Tensor:
        tokens = self.text_tokens(input_ids, attention_mask)
        return tokens[torch.arange(len(tokens), device=tokens.device), eos_positions(attention_mask)]


def eos_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the EOS token per row: the last attended position (QueryTokenizer layout)."""
    return attention_mask.sum(dim=1) - 1


def _init_head(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class GridVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP vision embeddings whose position embeddings form a ``rows x cols`` grid (e.g. 24x8
    for 384x128 inputs with patch 16), which transformers' square grid cannot hold. Other
    input sizes interpolate the grid bicubically, as the square version does."""

    def __init__(self, config, grid: tuple[int, int]):
        super().__init__(config)
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.position_ids = nn.Buffer(torch.arange(self.num_positions).expand((1, -1)),
                                      persistent=False)

    def interpolate_pos_encoding(self, embeddings, height: int, width: int) -> torch.Tensor:
        target = (height // self.patch_size, width // self.patch_size)
        table = self.position_embedding.weight.unsqueeze(0)
        if target == self.grid:
            return table
        grid = table[:, 1:].reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=target, mode="bicubic", align_corners=False)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def use_position_grid(clip: CLIPModel, grid: tuple[int, int]) -> None:
    """Give ``clip`` a non-square position grid (recorded in its config, so a saved folder
    loads back with it); its position embeddings are then uninitialised."""
    vision = clip.vision_model
    old = vision.embeddings
    new = GridVisionEmbeddings(clip.config.vision_config, grid)
    new.class_embedding = old.class_embedding
    new.patch_embedding = old.patch_embedding
    vision.embeddings = new
    clip.config.vision_config.position_grid = list(new.grid)


def load_clip(path: str | Path, dtype: torch.dtype = torch.float32) -> CLIPModel:
    """The CLIP weights of a retriever folder; a missing or broken file is an error naming it."""
    _require_folder(path, "retriever model")
    with reading(path, "the retriever's CLIP weights"):
        grid = getattr(CLIPConfig.from_pretrained(str(path)).vision_config, "position_grid", None)
        if not grid:
            return CLIPModel.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        clip = CLIPModel(CLIPConfig.from_pretrained(str(path)))
        use_position_grid(clip, grid)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(Path(path).glob("model*.safetensors")):  # save_pretrained's shards
            state.update(load_file(str(shard)))
        if not state:
            raise FileNotFoundError(f"{path}: no .safetensors weights")
        clip.load_state_dict(state, strict=True)
        return clip.to(dtype)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    _require_folder(path, "retriever tokenizer")
    with reading(path, "the retriever's tokenizer"):
        return AutoTokenizer.from_pretrained(str(path))


def _require_folder(path: str | Path, what: str) -> None:
    # from_pretrained would take a missing local folder for a hub id and say nothing useful.
    if not Path(path).is_dir():
        raise ArtifactError(f"{path}: {what} folder not found")
