"""Selector: model, subset sampler, warm-up losses and the warm-up stage end to end (CPU)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from llava_reid.artifacts import write_table
from llava_reid.selector import (
    INVALID_SCORE,
    Selector,
    candidate_positions,
    gumbel_topk,
    selectable_mask,
    temperature_at,
    topk_positions,
    valid_length,
    warmup,
)
from tests.conftest import small_config

D = 16


def tiny_selector(**kw) -> Selector:
    torch.manual_seed(0)
    return Selector(D, **{"layers": 1, "heads": 2, "ffn": 32, "dropout": 0.0, **kw})


def inputs(batch=3, positions=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, D, generator=g), dim=-1)  # [B, D]
    pool = F.normalize(torch.randn(batch, positions, D, generator=g), dim=-1)  # [B, P, D]
    valid = torch.zeros(batch, positions, dtype=torch.bool)
    for b, n in zip(range(batch), itertools.cycle([positions, 4, 7, 5]), strict=False):
        valid[b, :n] = True
    return query, pool, valid


def random_scores(batch=6, positions=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(batch, positions, generator=g) < 0.6
    valid[:, :4] = True
    logits = torch.randn(batch, positions, generator=g).masked_fill(~valid, INVALID_SCORE)
    return torch.log_softmax(logits, 1).masked_fill(~valid, INVALID_SCORE), valid


# -- model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [False, True])
def test_scores_are_log_probabilities_over_valid_positions(prior):
    model = tiny_selector(retrieval_prior=prior).eval()
    query, pool, valid = inputs()
    scores = model(query, pool, valid)
    assert scores.shape == (3, 10) and scores.dtype == torch.float32
    assert torch.all(scores[~valid] == INVALID_SCORE)
    sums = torch.stack([scores[b][valid[b]].exp().sum() for b in range(3)])
    assert torch.allclose(sums, torch.ones(3), atol=1e-5)
    none = model(query[:1], pool[:1], torch.zeros(1, 10, dtype=torch.bool))
    assert torch.all(none == INVALID_SCORE)


def test_invalid_positions_do_not_influence_valid_scores():
    model = tiny_selector().eval()
    query, pool, valid = inputs()
    scores = model(query, pool, valid)
    other = pool.clone()
    other[~valid] = torch.randn_like(other[~valid])
    assert torch.allclose(model(query, other, valid), scores, atol=1e-5)
    # Dropping trailing invalid columns is exact, not an approximation.
    short = model(query[1:2], pool[1:2, :4], valid[1:2, :4])
    assert torch.allclose(short, scores[1:2, :4], atol=1e-5)


def test_retrieval_prior_starts_as_plain_top_k():
    model = tiny_selector(retrieval_prior=True).eval()
    query, pool, valid = inputs(positions=20)
    valid[:] = True
    sims = torch.einsum("bd,bpd->bp", query, pool)
    expected = sims.topk(3, dim=1).indices.sort(dim=1).values
    assert torch.equal(topk_positions(model(query, pool, valid), 3), expected)


def test_save_load_round_trip(tmp_path):
    model = tiny_selector(retrieval_prior=True)
    with torch.no_grad():
        model.head.weight.normal_()
    model.eval()
    query, pool, valid = inputs()
    path = model.save(tmp_path / "warmup.safetensors", extra={"stage": "test", "n": 3})
    assert path == tmp_path / "warmup.safetensors"
    loaded = Selector.load(path, "cpu")
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded(query, pool, valid), model(query, pool, valid))
    meta = Selector.read_metadata(path)
    assert json.loads(meta["config"]) == model.config and meta["n"] == "3"
    # A folder works too (selector.safetensors inside), and only the final file is left.
    folder_file = model.save(tmp_path / "folder")
    assert folder_file.name == "selector.safetensors"
    assert torch.equal(Selector.load(tmp_path / "folder")(query, pool, valid),
                       model(query, pool, valid))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "warmup.safetensors"]
    assert Selector.from_config(model.config).config == model.config


def test_load_rejects_other_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a selector"):
        Selector.load(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        Selector.load(tmp_path / "missing")


# -- sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("straight_through", [True, False])
def test_gumbel_topk_is_an_exact_k_hot_on_valid_positions(straight_through):
    scores, valid = random_scores()
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        khot = gumbel_topk(scores, 3, 0.5, g, hard=True, straight_through=straight_through)
        assert khot.shape == scores.shape
        assert torch.all((khot == 0) | (khot == 1))
        assert torch.all(khot.sum(1) == 3)
        assert torch.all(khot[~valid] == 0)


def test_relaxed_sample_and_short_rows():
    scores, valid = random_scores()
    relaxed = gumbel_topk(scores, 3, 0.5, torch.Generator().manual_seed(0), hard=False)
    # Entries are >= 0 and each step spreads one unit of mass (an entry may exceed 1 a little:
    # the relaxation only damps, it does not cap, what earlier steps took).
    assert torch.all(relaxed >= 0)
    assert torch.allclose(relaxed.sum(1), torch.full((6,), 3.0), atol=1e-4)
    assert torch.all(relaxed[~valid] < 1e-6)
    # A row with fewer valid positions than k gets all of them and nothing else.
    short = torch.full((1, 6), INVALID_SCORE)
    short[0, [1, 4]] = math.log(0.5)
    khot = gumbel_topk(short, 3, 1.0, torch.Generator().manual_seed(0))
    assert khot.tolist() == [[0, 1, 0, 0, 1, 0]]


def test_gumbel_topk_is_deterministic_given_the_generator():
    scores, _ = random_scores()

    def draw(seed, **kw):
        return gumbel_topk(scores, 3, 0.3, torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    # The noise does not depend on the mode: the same draw with or without a gradient path.
    assert torch.equal(draw(7), draw(7, straight_through=False))


def test_gumbel_top1_frequencies_follow_the_scores():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().expand(20000, 4)
    khot = gumbel_topk(scores, 1, 1.0, torch.Generator().manual_seed(3))
    assert torch.allclose(khot.mean(0), probs, atol=0.015)


@pytest.mark.parametrize("prior", [False, True])
def test_straight_through_gradient_reaches_the_selector(prior):
    model = tiny_selector(retrieval_prior=prior).train()
    query, pool, valid = inputs(batch=4, positions=12)
    values = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))  # fixed vectors

    def grads(straight_through):
        model.zero_grad(set_to_none=True)
        scores = model(query, pool, valid)
        khot = gumbel_topk(scores, 3, 0.5, torch.Generator().manual_seed(0),
                           straight_through=straight_through)
        loss = (khot @ values).pow(2).sum() + 0.0 * scores.sum()  # scalar from the k-hot
        loss.backward()
        return khot, [p.grad for p in model.parameters()]

    khot, with_st = grads(True)
    assert torch.all(khot.sum(1) == 3) and khot.requires_grad
    assert any(g is not None and g.abs().sum() > 0 for g in with_st)
    khot, without = grads(False)
    assert not khot.requires_grad
    assert all(g is None or torch.all(g == 0) for g in without)


def test_topk_positions_in_rank_order():
    scores = torch.tensor([
        [-1.0, -3.0, -0.5, -2.0, INVALID_SCORE],
        [-2.0, -2.0, -2.0, -1.0, -9.0],  # ties go to the lower position
        [INVALID_SCORE, -1.0, INVALID_SCORE, INVALID_SCORE, -2.0],  # fewer than k valid
    ])
    assert topk_positions(scores, 3).tolist() == [[0, 2, 3], [0, 1, 3], [1, 4, -1]]
    scores, valid = random_scores(seed=4)
    picked = topk_positions(scores, 3)
    assert torch.all(valid.gather(1, picked))
    assert torch.all(picked[:, 1:] > picked[:, :-1])


def test_temperature_schedule():
    assert temperature_at(0, 11) == 1.0
    assert temperature_at(10, 11) == pytest.approx(0.1)
    assert temperature_at(5, 11) == pytest.approx(0.55)
    assert temperature_at(50, 11) == pytest.approx(0.1)
    assert temperature_at(0, 1, 2.0, 0.5) == 2.0
    values = [temperature_at(s, 100) for s in range(100)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_pool_lengths_per_round():
    assert [valid_length(200, r) for r in range(5)] == [200, 100, 67, 50, 40]
    mask = selectable_mask(torch.arange(5), 200)
    assert mask.shape == (5, 199)
    assert mask.sum(1).tolist() == [199, 99, 66, 49, 39]
    assert mask[4, :39].all() and not mask[4, 39:].any()
    # A pool shorter than N (small gallery) keeps k_r from N, cut to the pool.
    assert selectable_mask(torch.tensor([0, 4]), 200, 30).sum(1).tolist() == [29, 29]
    assert candidate_positions(torch.tensor([[0, 3, 5], [2, 4, -1]])).tolist() == [
        [0, 1, 4, 6], [0, 3, 5, -1]]


# -- warm-up losses and data -----------------------------------------------------------------


def test_plackett_luce_set_loss_matches_enumeration():
    scores, valid = random_scores(batch=3, positions=7, seed=2)
    targets = torch.tensor([[0, 1, 2], [3, 1, 0], [2, 0, 3]])
    got = warmup.plackett_luce_set_loss(scores, targets)
    probs = scores.exp() * valid
    want = []
    for b in range(3):
        total = 0.0
        for order in itertools.permutations(targets[b].tolist()):
            p, left = 1.0, 1.0
            for j in order:
                p *= float(probs[b, j]) / left
                left -= float(probs[b, j])
            total += p
        want.append(-math.log(total))
    assert float(got) == pytest.approx(float(np.mean(want)), rel=1e-4)


def test_bce_loss_is_the_originals():
    scores, _ = random_scores(seed=5)
    targets = torch.tensor([[0, 1, 2]] * 6)
    ref = torch.nn.BCELoss()(scores.gather(1, targets).exp(), torch.ones(6, 3))
    assert float(warmup.bce_loss(scores, targets)) == pytest.approx(float(ref), rel=1e-5)


def test_drop_positions_targets_are_plain_top_k_of_the_thinned_pool():
    valid = torch.ones(64, 30, dtype=torch.bool)
    valid[:, 20:] = False
    valid[0, 3:] = False  # too short to thin: stays whole
    kept, targets = warmup.drop_positions(valid, 3, 0.5, torch.Generator().manual_seed(0))
    assert torch.all(kept <= valid) and kept[0].sum() == 3
    for b in range(64):
        assert targets[b].tolist() == kept[b].nonzero().squeeze(1)[:3].tolist()
    _, plain = warmup.drop_positions(valid, 3, 0.0, torch.Generator())
    assert torch.all(plain == torch.arange(3))


def test_holdout_is_by_group_and_seeded():
    groups = np.repeat(np.arange(50), 4)
    mask = warmup.holdout_mask(groups, 0.1, 3)
    held = set(groups[mask].tolist())
    assert len(held) == 5 and not (held & set(groups[~mask].tolist()))
    assert np.array_equal(mask, warmup.holdout_mask(groups, 0.1, 3))
    assert not np.array_equal(mask, warmup.holdout_mask(groups, 0.1, 4))
    assert not warmup.holdout_mask(groups, 0.0, 3).any()


# -- warm-up training ------------------------------------------------------------------------


def synthetic_pools(rows=320, gallery=240, pool=40, seed=0):
    """Queries near a gallery image, pools = their plain top-N, rounds 0..4, identity groups."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(gallery, D, generator=g), dim=-1)  # [G, D]
    source = torch.randint(0, gallery, (rows,), generator=g)
    query = F.normalize(feats[source] + 0.35 * torch.randn(rows, D, generator=g), dim=-1)
    pools = torch.sort(query @ feats.t(), dim=1, descending=True, stable=True).indices[:, :pool]
    rounds = torch.arange(rows) % 5
    return query, pools, rounds, feats, (source // 2).numpy()


MODEL = {"layers": 1, "heads": 2, "ffn": 32, "dropout": 0.1, "retrieval_prior": True}
WARM = {"epochs": 3, "batch_size": 32, "lr": 1e-3, "prior_lr": 3e-2, "loss": "plackett_luce",
        "pool_dropout": 0.0, "holdout": 0.2, "text_batch_size": 64}


def test_warmup_imitates_plain_top_k_on_held_out_pools():
    query, pools, rounds, feats, groups = synthetic_pools()
    heldout = torch.from_numpy(warmup.holdout_mask(groups, 0.2, 0))
    kw = {"pool_size": 40, "num_candidates": 4,
          "architecture": warmup.SelectorArchitecture(**MODEL),
          "schedule": warmup.WarmupSchedule(**WARM), "seed": 0}
    model, metrics = warmup.train_warmup(query, pools, rounds, feats, heldout, **kw)
    assert metrics["heldout_agreement"] >= 0.9
    assert metrics["heldout_mean_overlap"] >= metrics["heldout_agreement"]
    assert metrics["train_pools"] + metrics["heldout_pools"] == len(pools)
    assert metrics["heldout_pools"] == int(heldout.sum())
    losses = [h["loss"] for h in metrics["history"][1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert metrics["prior_scale"] > 50.0  # the prior sharpened towards top-k
    assert not model.training
    # Same seed, same result.
    _, again = warmup.train_warmup(query, pools, rounds, feats, heldout, **kw)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in again["history"]]


@pytest.mark.parametrize("loss", ["plackett_luce", "bce"])
def test_warmup_without_prior_learns(loss):
    """Without the prior (the spec's plain transformer) training runs and the loss falls; it
    needs far more steps than a test can afford to imitate top-k well (see the report)."""
    query, pools, rounds, feats, groups = synthetic_pools(rows=240, pool=16)
    heldout = torch.from_numpy(warmup.holdout_mask(groups, 0.2, 0))
    _, metrics = warmup.train_warmup(
        query, pools, rounds, feats, heldout, pool_size=16, num_candidates=4,
        architecture=warmup.SelectorArchitecture(**{**MODEL, "retrieval_prior": False,
                                                    "dropout": 0.0}),
        schedule=warmup.WarmupSchedule(**{**WARM, "epochs": 4, "lr": 3e-3, "loss": loss,
                                          "pool_dropout": 0.3}),
        seed=0)
    history = metrics["history"]
    assert history[-1]["loss"] < history[1]["loss"]
    assert "prior_scale" not in metrics


# -- the stage, from files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def retriever_folder(tmp_path_factory):
    """A tiny untrained retriever saved the way train-retriever saves one (fast, real loader)."""
    from llava_reid.retriever.encoder import write_settings
    from llava_reid.retriever.init import build_tiny

    rcfg = small_config()["retriever"]
    rcfg["tiny"]["embed_dim"] = D
    corpus = [f"a {c} {g} with a {b} bag and {s} shoes"
              for c in ("red", "blue", "green", "black", "white") for g in ("man", "woman")
              for b in ("small", "large", "grey") for s in ("brown", "white")]
    model, tokenizer = build_tiny(rcfg, corpus, seed=0)
    folder = tmp_path_factory.mktemp("retriever") / "model"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_settings(folder, rcfg)
    return folder, corpus


def test_warmup_stage_from_files(tmp_path, retriever_folder):
    from llava_reid.retriever.encoder import RetrieverEncoder
    from llava_reid.retriever.features import embedding_column

    folder, corpus = retriever_folder
    rng = np.random.default_rng(0)
    texts = [f"{a}. {b}" for a, b in itertools.product(corpus[:20], corpus[20:32])]  # 240
    query = RetrieverEncoder.from_pretrained(folder, "cpu").encode_texts(texts)  # [R, D]
    # Gallery: two images near each query's feature and as many distractors; ids not 0-based.
    near = F.normalize(query.repeat(2, 1) + 0.5 * torch.randn(2 * len(texts), D), dim=-1)
    feats = torch.cat([near, F.normalize(torch.randn(len(near), D), dim=-1)])
    image_idx = 1000 + rng.permutation(len(feats))
    write_table(pa.table({
        "image_idx": pa.array(image_idx, pa.int32()),
        "pid": pa.array(np.arange(len(feats)) % len(texts), pa.int64()),
        "file_path": [f"img/{i}.jpg" for i in image_idx],
        "feat": embedding_column(feats.numpy()),
    }), tmp_path / "train_gallery.parquet", "gallery_features", config_hash="t", producer="t")
    n = len(texts)
    pools = torch.sort(query @ feats.t(), dim=1, descending=True, stable=True).indices[:, :40]
    rounds = np.arange(n) % 5
    augmented = np.arange(n) % 7 == 0  # ignored by the warm-up
    write_table(pa.table({
        "example_id": np.arange(n), "image_idx": np.arange(n), "pid": np.arange(n) // 2,
        "round": pa.array(rounds, pa.int8()), "initial_description": texts,
        "history_questions": [[] for _ in texts], "history_answers": [[] for _ in texts],
        "description": texts, "target_question": ["?"] * n,
        "target_answer_index": pa.array(np.zeros(n), pa.int16()),
        "template_id": pa.array(np.zeros(n), pa.int8()), "idk_augmented": augmented,
        "label_gain": pa.array(np.ones(n), pa.float32()),
        "pool": [image_idx[p].astype(np.int32) for p in pools.numpy()],
    }), tmp_path / "conversations.parquet", "conversations", config_hash="t", producer="t")

    cfg = {"seed": 5, "device": "cpu", "dialogue": {"pool_size": 40, "num_candidates": 4},
           "selector": {**MODEL, "warmup": {**WARM, "epochs": 2}}}
    out, metrics = tmp_path / "selector" / "warmup.safetensors", tmp_path / "metrics.json"
    warmup.run(cfg, conversations=str(tmp_path / "conversations.parquet"),
               gallery=str(tmp_path / "train_gallery.parquet"), retriever=str(folder),
               out=str(out), metrics=str(metrics))
    result = json.loads(metrics.read_text())
    assert result["train_pools"] + result["heldout_pools"] == int((~augmented).sum())
    assert result["heldout_agreement"] >= 0.9
    assert result["pool_order_consistency"] > 0.95
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    selector = Selector.load(out)
    assert selector.config["dim"] == D and selector.config["retrieval_prior"]
    assert Selector.read_metadata(out)["stage"] == "warmup-selector"
    assert sorted(p.name for p in out.parent.iterdir()) == ["warmup.safetensors"]


def test_prior_ranking_survives_bf16_autocast():
    model = tiny_selector(retrieval_prior=True).eval()
    query, pool, valid = inputs(positions=20)
    valid[:] = True
    expected = torch.einsum("bd,bpd->bp", query, pool).topk(3, dim=1).indices.sort(1).values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(query, pool, valid)
    assert scores.dtype == torch.float32
    assert torch.equal(topk_positions(scores, 3), expected)
