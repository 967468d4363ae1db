"""IRRA's checkpoint (CLIP in OpenAI's layout plus IRRA's heads) -> our retriever's CLIPModel.

IRRA, and the original LLaVA-ReID that trains it, keep the CLIP as ``base_model`` in OpenAI's
module layout (``visual.conv1``, ``visual.transformer.resblocks.N.attn.in_proj_weight``,
``positional_embedding``, ``text_projection``, ...) next to an identity classifier and an MLM
cross-former. The conversion is exact: the same weights, QuickGELU, eps 1e-5, text features at
the EOS token and image features at the CLS token after ``ln_post`` and ``proj``. Shapes come
from the checkpoint (widths, depths, text context, vocabulary); the head count follows
OpenAI's convention (width / 64), which the weights cannot tell.

IRRA trains at 384x128, so its vision position embeddings form a 24x8 grid; the converted model
keeps that grid (``model.GridVisionEmbeddings``). The grid's shape comes from the input size.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

from llava_reid.retriever.model import use_position_grid

HEAD_WIDTH = 64  # OpenAI CLIP: attention heads = width / 64 in both towers

# IRRA's training heads (beside ``base_model.``).
ID_HEAD = ("classifier.weight", "classifier.bias")
MLM_PREFIXES = ("cross_attn.", "cross_modal_transformer.", "ln_pre_t.", "ln_pre_i.", "ln_post.",
                "mlm_head.")

# Per residual block: OpenAI name -> transformers' CLIP name (in_proj is split separately).
BLOCK = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Single tensors: OpenAI name -> transformers' name; projections are transposed.
SINGLE = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
          "transformer.resblocks.": "text_model.encoder.layers."}
# Tensors of OpenAI's layout that transformers' CLIP has no place for and does not need.
IGNORED = {"input_resolution", "context_length", "vocab_size"}


class CheckpointMismatch(ValueError):
    """The checkpoint's keys or shapes are not those of an IRRA / OpenAI-layout CLIP."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, safely: safetensors, or a torch pickle of plain tensors
    (``weights_only``), unwrapped from a ``model`` / ``state_dict`` entry and DDP's ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors name what a safe load refused
            raise CheckpointMismatch(f"{path}: not loadable with weights_only=True: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatch(f"{path}: not a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def split_irra(state: dict[str, torch.Tensor], source: str):
    """(CLIP tensors in OpenAI's layout, ID-head tensors, MLM-head tensors). Accepts IRRA's
    ``base_model.``-prefixed layout or a bare OpenAI CLIP state_dict."""
    prefixed = any(k.startswith("base_model.") for k in state)
    clip, id_head, mlm, unexpected = {}, {}, {}, []
    for key, value in state.items():
        if prefixed and key.startswith("base_model."):
            clip[key[len("base_model."):]] = value
        elif key in ID_HEAD:
            id_head[key] = value
        elif key.startswith(MLM_PREFIXES):
            mlm[key] = value
        elif not prefixed:
            clip[key] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointMismatch(f"{source}: unexpected keys {sorted(unexpected)[:20]}")
    return clip, id_head, mlm


def _layers(clip: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in clip if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def clip_config(clip: dict[str, torch.Tensor], image_size: tuple[int, int], source: str,
                special_ids: dict[str, int]) -> tuple[CLIPConfig, tuple[int, int]]:
    """transformers' CLIPConfig of an OpenAI-layout state_dict, and its position grid."""
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                "token_embedding.weight", "positional_embedding", "text_projection"]
    missing = [k for k in required if k not in clip]
    if missing:
        raise CheckpointMismatch(f"{source}: missing keys {missing} (not a ViT CLIP checkpoint)")
    v_width, _, patch, patch_w = clip["visual.conv1.weight"].shape
    if patch != patch_w:
        raise CheckpointMismatch(f"{source}: non-square patches {patch}x{patch_w}")
    height, width = image_size
    if height % patch or width % patch:
        raise CheckpointMismatch(f"{source}: input {height}x{width} is not a multiple of patch {patch}")
    grid = (height // patch, width // patch)
    positions = clip["visual.positional_embedding"].shape[0]
    if positions != grid[0] * grid[1] + 1:
        raise CheckpointMismatch(
            f"{source}: {positions - 1} vision positions, but a {height}x{width} input with patch "
            f"{patch} makes a {grid[0]}x{grid[1]} grid: set the input size it was trained at")
    t_vocab, t_width = clip["token_embedding.weight"].shape
    context = clip["positional_embedding"].shape[0]
    embed_dim = clip["text_projection"].shape[1]
    if clip["visual.proj"].shape[1] != embed_dim:
        raise CheckpointMismatch(f"{source}: visual.proj and text_projection disagree on the "
                                 "joint size")
    tower = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": embed_dim}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": t_vocab,
            "hidden_size": t_width,
            "intermediate_size": clip["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _layers(clip, "transformer.resblocks."),
            "num_attention_heads": max(1, t_width // HEAD_WIDTH),
            "max_position_embeddings": context,
            **special_ids,
        },
        vision_config={
            **tower,
            "hidden_size": v_width,
            "intermediate_size": clip["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _layers(clip, "visual.transformer.resblocks."),
            "num_attention_heads": max(1, v_width // HEAD_WIDTH),
            "image_size": max(height, width),
            "patch_size": patch,
        },
        projection_dim=embed_dim,
    )
    return config, grid


def hf_state_dict(clip: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """OpenAI-layout tensors renamed (and split / transposed) to transformers' CLIP."""
    out, unmapped = {}, []
    for key, value in clip.items():
        if key in SINGLE:
            out[SINGLE[key]] = value
        elif key in TRANSPOSED:
            out[TRANSPOSED[key]] = value.t().contiguous()
        elif key in IGNORED:
            continue
        else:
            tower = next((t for t in TOWERS if key.startswith(t)), None)
            rest = key[len(tower):].split(".", 1) if tower else None
            if rest is None or len(rest) != 2:
                unmapped.append(key)
                continue
            target = TOWERS[tower] + rest[0] + ".self_attn."
            if rest[1] in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest[1].rsplit("_", 1)[1]
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{target}{name}_proj.{kind}"] = part.contiguous()
            elif rest[1] in BLOCK:
                out[TOWERS[tower] + rest[0] + "." + BLOCK[rest[1]]] = value
            else:
                unmapped.append(key)
    if unmapped:
        raise CheckpointMismatch(f"{source}: unexpected keys {sorted(unmapped)[:20]}")
    return out


def build_clip(clip: dict[str, torch.Tensor], image_size: tuple[int, int], source: str,
               special_ids: dict[str, int]) -> CLIPModel:
    """transformers' CLIPModel holding exactly the checkpoint's CLIP weights (float32)."""
    config, grid = clip_config(clip, image_size, source, special_ids)
    model = CLIPModel(config)
    if grid[0] != grid[1]:
        use_position_grid(model, grid)
    state = {k: v.float() for k, v in hf_state_dict(clip, source).items()}
    if "logit_scale" not in state:
        state["logit_scale"] = model.logit_scale.detach().clone()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatch(f"{source}: missing keys {missing[:20]}, unexpected keys "
                                 f"{unexpected[:20]} after conversion")
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointMismatch(f"{source}: shapes do not match: {wrong[:10]}")
    model.load_state_dict(state, strict=True)
    return model.eval()
