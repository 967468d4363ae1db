"""Retriever building blocks: losses, masking, query tokenisation, transforms, init."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from PIL import Image

from llava_reid.data.transforms import RetrieverTransform, to_tensor
from llava_reid.retriever.init import SPECIAL_TOKENS, stretch_text_context
from llava_reid.retriever.losses import id_loss, mask_tokens, sdm_loss
from llava_reid.retriever.model import QueryTokenizer, eos_positions
from llava_reid.tokenization import train_bpe_tokenizer

CORPUS = [
    "a man in a red shirt and blue jeans",
    "she wore a green dress and black shoes",
    "he carried a brown backpack",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, 300, SPECIAL_TOKENS, lowercase=True)


def test_sdm_matches_hand_computation():
    # Two texts, two images, different identities, orthogonal unit features.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pids = torch.tensor([3, 7])
    t = 0.5
    # logits per row: [2, 0] -> p = [e^2, 1] / (e^2 + 1); target [1, 0] (eps only elsewhere).
    p0 = math.exp(2) / (math.exp(2) + 1)
    p1 = 1 - p0
    eps = 1e-8
    row = p0 * (math.log(p0) - math.log(1 + eps)) + p1 * (math.log(p1) - math.log(eps))
    expected = 2 * row  # both directions, identical by symmetry
    got = sdm_loss(img, txt, pids, pids, t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_sdm_spreads_target_over_same_identity():
    # Image 0 and 1 share identity 5: a text of identity 5 matching both equally is optimal.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pids = torch.tensor([5, 5, 9])
    good = sdm_loss(img, txt, pids, pids, 0.02)
    swapped = sdm_loss(img, txt[[2, 1, 0]], pids, pids, 0.02)
    assert good.item() < 1e-3 < swapped.item()


def test_id_loss_is_mean_of_both_towers():
    clf = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        clf.weight.copy_(torch.eye(3, 2))
    img = torch.tensor([[5.0, 0.0]])
    txt = torch.tensor([[0.0, 5.0]])
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * (ce(clf(img), torch.tensor([0])) + ce(clf(txt), torch.tensor([0])))
    assert id_loss(clf, img, txt, torch.tensor([0])).item() == pytest.approx(expected.item())


def test_mask_tokens_never_touches_specials_or_padding(tokenizer):
    tok = QueryTokenizer(tokenizer, 24)
    ids, mask = tok(["a man in a red shirt", "he carried a brown backpack and black shoes"])
    specials = sorted(set(tokenizer.all_special_ids))
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, mask, tokenizer.mask_token_id, len(tokenizer),
                                 specials, 0.5, g)
    chosen = labels != -100
    assert chosen.any(dim=1).all()  # at least one prediction per row
    assert not chosen[mask == 0].any()
    for sid in specials:
        assert not chosen[ids == sid].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    # Same generator seed -> same masks.
    again = mask_tokens(ids, mask, tokenizer.mask_token_id, len(tokenizer), specials, 0.5,
                        torch.Generator().manual_seed(0))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


def test_query_tokenizer_keeps_newest_tokens_and_warns_once(tokenizer, caplog):
    tok = QueryTokenizer(tokenizer, 8)
    short_ids, short_mask = tok(["a man"])
    assert short_ids[0, 0] == tokenizer.bos_token_id
    assert short_ids[0, eos_positions(short_mask)[0]] == tokenizer.eos_token_id
    long_text = "a man in a red shirt and blue jeans he carried a brown backpack"
    with caplog.at_level(logging.WARNING):
        ids, mask = tok([long_text, long_text])
    assert mask.sum(1).tolist() == [8, 8] and ids.shape == (2, 8)
    body = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert ids[0, 1:7].tolist() == body[-6:]  # the newest six tokens survive
    assert ids[0, 7] == tokenizer.eos_token_id
    assert sum("exceeds the retriever context" in r.message for r in caplog.records) == 1


def test_eval_transform_is_resize_and_normalise():
    img = Image.new("RGB", (64, 192), (255, 0, 0))
    x = RetrieverTransform(96, 32, train=False)(img)
    assert x.shape == (3, 96, 32)
    assert torch.allclose(x, to_tensor(img.resize((32, 96))))


def test_train_transform_is_seeded_and_keeps_shape():
    img = Image.effect_noise((64, 192), 40).convert("RGB")
    t = RetrieverTransform(96, 32, train=True)
    a = t(img, torch.Generator().manual_seed(1))
    b = t(img, torch.Generator().manual_seed(1))
    c = t(img, torch.Generator().manual_seed(2))
    assert a.shape == (3, 96, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError):
        t(img)


def test_sincos_grid_codes_rows_and_columns():
    from llava_reid.retriever.init import sincos_grid

    codes = sincos_grid(3, 2, 10)  # 10 channels: two frequencies per quarter, 2 left zero
    assert codes.shape == (6, 10)
    assert torch.equal(codes[:, 8:], torch.zeros(6, 2))
    # Row-major: patch 3 is row 1, column 1; the first frequency is 1 radian per step.
    assert torch.allclose(codes[3, 0], torch.sin(torch.tensor(1.0)))
    assert torch.allclose(codes[3, 2], torch.cos(torch.tensor(1.0)))
    assert torch.allclose(codes[0, 4:8], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(codes[1, 4], torch.sin(torch.tensor(1.0)))  # column 1
    assert len({tuple(c.tolist()) for c in codes}) == 6  # every patch its own code


def test_tiny_sincos_positions_survive_save_and_load(tmp_path):
    from llava_reid.retriever.init import SINCOS_SCALE, build_tiny, sincos_grid
    from llava_reid.retriever.model import load_clip

    tiny = {"embed_dim": 16, "hidden_size": 16, "vision_layers": 1, "text_layers": 1,
            "heads": 2, "patch_size": 8, "vocab_size": 300, "position_init": "sincos"}
    rcfg = {"tiny": tiny, "image_height": 32, "image_width": 16, "text_length": 16}
    model, tokenizer = build_tiny(rcfg, ["a man in a red t-shirt and blue jeans"] * 4, 0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_clip(tmp_path).vision_model.embeddings
    assert loaded.grid == (4, 2)
    table = loaded.position_embedding.weight
    assert torch.equal(table[0], torch.zeros(16))
    assert torch.allclose(table[1:], SINCOS_SCALE * sincos_grid(4, 2, 16))
    pixels = torch.zeros(2, 3, 32, 16)
    assert load_clip(tmp_path).vision_model(pixel_values=pixels, interpolate_pos_encoding=True
                                            ).last_hidden_state.shape == (2, 9, 16)
    random_model, _ = build_tiny({**rcfg, "tiny": {**tiny, "position_init": "random"}},
                                 ["a man in a red t-shirt"] * 4, 0)
    assert not hasattr(random_model.vision_model.embeddings, "grid")  # CLIP's square grid


def test_stretch_text_context_interpolates_positions():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 7, "projection_dim": 8},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8,
                       "projection_dim": 8},
        projection_dim=8,
    )
    model = CLIPModel(cfg)
    old = model.text_model.embeddings.position_embedding.weight.detach().clone()
    stretch_text_context(model, 13)
    new = model.text_model.embeddings.position_embedding.weight
    assert new.shape == (13, 16)
    assert torch.allclose(new[0], old[0]) and torch.allclose(new[-1], old[-1])
    # align_corners: new position 6 of 0..12 sits exactly on old position 3 of 0..6, and new
    # position 1 sits at old 0.5, halfway between old 0 and old 1.
    assert torch.allclose(new[6], old[3], atol=1e-6)
    assert torch.allclose(new[1], (old[0] + old[1]) / 2, atol=1e-6)
    ids = torch.ones(1, 13, dtype=torch.long)
    out = model.text_model(input_ids=ids)
    assert out.last_hidden_state.shape == (1, 13, 16)


def test_text_views_mix_full_initial_and_partial_descriptions():
    import torch

    from llava_reid.retriever.train import sample_text_view

    fine = "I saw a man. He wore a red top. His shoes were white. He carried a bag."
    initial = "I saw a man in red."
    g = torch.Generator().manual_seed(0)
    views = [sample_text_view(fine, initial, {"initial": 0.2, "partial": 0.3}, g)
             for _ in range(600)]
    n_initial = views.count(initial)
    n_full = views.count(fine)
    partial = [v for v in views if v not in (fine, initial)]
    assert 80 < n_initial < 160  # ~20 %
    assert 120 < len(partial) < 240 and n_full > 240  # ~30 % partial (some keep all), ~50 %
    for v in partial:  # ordered subsets of the sentences, never empty
        sentences = [s.strip() + "." for s in v.split(".") if s.strip()]
        assert sentences and all(s in fine for s in sentences)
        assert [fine.index(s) for s in sentences] == sorted(fine.index(s) for s in sentences)
    off = torch.Generator().manual_seed(0)
    assert {sample_text_view(fine, initial, {"initial": 0.0, "partial": 0.0}, off)
            for _ in range(50)} == {fine}
