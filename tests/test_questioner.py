"""The questioner: token layout, image splicing, batched generation, caching, SFT batches."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_reid.questioner.factory import build_tiny_questioner
from llava_reid.questioner.generate import (
    GenerationConfig,
    PrefixCache,
    choose_tokens,
    generate_questions,
    hashed_uniform,
)
from llava_reid.questioner.model import Questioner, splice_images
from llava_reid.questioner.prompts import (
    NUM_TEMPLATES,
    build_prompt,
    clean_question,
    shared_prefix,
)
from llava_reid.questioner.quality import is_well_formed
from llava_reid.questioner.vision import content_box, tokens_per_image
from llava_reid.questioner.visual_cache import VisualTokenCache, build_cache, weights_hash

TINY = dict(hidden_size=32, intermediate_size=64, layers=2, heads=4, kv_heads=2, vocab_size=400,
            max_positions=512, vision_hidden_size=16, vision_layers=1, vision_heads=2,
            image_size=32, patch_size=8)
QCFG = dict(pool_ratio=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
CORPUS = ["I saw a man in a red top.", "What colour were his shoes?", "His shoes were white.",
          "Was she carrying a bag?", "No, she did not carry a bag."] * 40


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_questioner")
    model, tokenizer = build_tiny_questioner(TINY, CORPUS, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def questioner(tiny_folder):
    torch.manual_seed(0)
    return Questioner.from_pretrained(tiny_folder, QCFG, "cpu")


def _images(n):
    return [Image.new("RGB", (16, 48), (30 * i % 255, 80, 200 - 20 * i)) for i in range(n)]


def test_visual_token_layout_matches_the_pedestrian_crop():
    # 27x27 SigLIP grid pooled to 14x14; a 128x384 crop keeps 4 columns + newline = 70 tokens.
    assert content_box(14, (384, 128)) == (0, 14, 5, 9)
    assert tokens_per_image(27, 2, (384, 128)) == 70
    assert tokens_per_image(27, 2, (384, 384)) == 14 * 15
    assert tokens_per_image(27, 1, (100, 300)) == 9 * 28  # wide image: rows dropped


def test_prompt_layout_puts_fixed_text_first_and_images_in_rank_order():
    p = build_prompt(1, 4, "I saw a man.", ["Was he carrying a bag?"], ["No."])
    assert p.num_images == 4
    assert p.texts[0].startswith(shared_prefix(1)) and p.prefix_len == len(shared_prefix(1))
    text = p.as_text()
    assert text.index("[Candidate person] <image>") < text.index("#1: <image>") \
        < text.index("#3: <image>") < text.index("Witness: I saw a man.")
    assert text.endswith("<|im_start|>assistant\n")
    assert clean_question("assistant\nWhat colour was it?<|im_end|>junk") == \
        "What colour was it?"
    assert {shared_prefix(t) for t in range(NUM_TEMPLATES)}.__len__() == NUM_TEMPLATES


def test_questioner_sees_exactly_the_selected_images_once_in_order(questioner):
    """The original fed each image twice and skipped others at evaluation: record the
    language model's input embeddings and check the image slots hold exactly the candidates'
    cached tokens, in the given order, each once."""
    tokens = questioner.encode_images(_images(6))
    by_id = {100 + i: t for i, t in enumerate(tokens)}
    selections = [[103, 101, 105, 100], [102, 104]]
    prompts = [build_prompt(0, len(s), "I saw a woman.", [], []) for s in selections]
    captured = []
    hook = questioner.base.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.append(kwargs["inputs_embeds"].detach().clone()),
        with_kwargs=True)
    try:
        result = generate_questions(
            questioner, prompts, selections, lambda ids: [by_id[i] for i in ids], [1, 2],
            GenerationConfig(max_new_tokens=3, do_sample=False), batch_size=8)
    finally:
        hook.remove()
    assert result.seen == selections
    # captured[0] is the shared prefix (no images); captured[1] is the batch's own part.
    prefill = captured[1]
    for row, ids in enumerate(selections):
        body = questioner.prompt_ids(prompts[row], [len(by_id[i]) for i in ids])
        width = prefill.shape[1]
        slots = torch.tensor(body) == questioner.image_token_id
        row_embeds = prefill[row, width - len(body):][slots]
        expected = torch.cat([by_id[i] for i in ids])
        assert row_embeds.shape == expected.shape
        assert torch.equal(row_embeds, expected.to(row_embeds.dtype))


def test_splice_rejects_a_count_mismatch(questioner):
    ids = torch.tensor([[1, questioner.image_token_id, questioner.image_token_id, 2]])
    embeds = questioner.embed(ids)
    with pytest.raises(ValueError, match="2 image placeholders but 3 visual tokens"):
        splice_images(embeds, ids, questioner.image_token_id, [[torch.zeros(3, 32)]])


def test_batched_prefix_generation_equals_plain_greedy_decoding(questioner):
    """Shared-prefix KV + padding between prefix and body must not change the result."""
    tokens = questioner.encode_images(_images(4))
    prompts = [build_prompt(t, 4, "I saw a man in red.", q, a) for t, q, a in [
        (0, [], []), (0, ["Was he carrying a bag?"], ["No, he did not carry a bag."]),
        (2, [], [])]]
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False)
    got = generate_questions(questioner, prompts, [[0, 1, 2, 3]] * 3,
                             lambda ids: [tokens[i] for i in ids], [0, 0, 0], cfg).questions
    for prompt, text in zip(prompts, got, strict=True):
        ids = questioner.prefix_ids(prompt) + questioner.prompt_ids(prompt, [len(t) for t in tokens])
        out: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                t = torch.tensor([ids + out])
                e = splice_images(questioner.embed(t), t, questioner.image_token_id, [tokens])
                h = questioner.base.model.language_model(inputs_embeds=e).last_hidden_state
                logits = questioner.base.lm_head(h[:, -1])[0]
                if not out:
                    logits[questioner.stop_ids] = -torch.inf
                nxt = int(logits.argmax())
                if nxt in questioner.stop_ids:
                    break
                out.append(nxt)
        assert text == clean_question(questioner.tokenizer.decode(out, skip_special_tokens=True))


def test_prefill_in_blocks_of_rows_gives_the_same_questions(questioner):
    """Rows are prefilled longest first in blocks padded to their own longest body; one
    row per block must give what one block for all rows gives, in the caller's order."""
    tokens = questioner.encode_images(_images(4))
    histories = [(["Was he carrying a bag?"], ["No, he did not carry a bag."]), ([], []),
                 (["What colour were his shoes?", "Did he wear a hat?"],
                  ["His shoes were white.", "Yes, a black cap."])]
    prompts = [build_prompt(i % NUM_TEMPLATES, 4, "I saw a man in red.", q, a)
               for i, (q, a) in enumerate(histories)]
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, top_p=0.9)

    def run(prefill_tokens):
        return generate_questions(questioner, prompts, [[0, 1, 2, 3]] * 3,
                                  lambda ids: [tokens[i] for i in ids], [5, 6, 7], cfg,
                                  prefill_tokens=prefill_tokens).questions

    one_block, row_blocks = run(None), run(1)
    assert row_blocks == one_block
    alone = [generate_questions(questioner, [p], [[0, 1, 2, 3]],
                                lambda ids: [tokens[i] for i in ids], [s], cfg).questions[0]
             for p, s in zip(prompts, [5, 6, 7], strict=True)]
    assert one_block == alone


def test_sampling_depends_on_the_row_seed_not_the_batch(questioner):
    tokens = questioner.encode_images(_images(4))
    prompts = [build_prompt(i % NUM_TEMPLATES, 4, "I saw a man.", [], []) for i in range(5)]
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, top_p=0.9)

    def source(ids):
        return [tokens[i] for i in ids]

    together = generate_questions(questioner, prompts, [[0, 1, 2, 3]] * 5, source,
                                  [11, 12, 13, 14, 15], cfg).questions
    alone = [generate_questions(questioner, [p], [[0, 1, 2, 3]], source, [s], cfg).questions[0]
             for p, s in zip(prompts, [11, 12, 13, 14, 15], strict=True)]
    assert together == alone
    again = generate_questions(questioner, prompts, [[0, 1, 2, 3]] * 5, source,
                               [11, 12, 13, 14, 15], cfg).questions
    assert again == together


def test_samples_per_prompt_share_one_prefill_and_differ_by_seed(questioner):
    from llava_reid.questioner.generate import sample_seed

    tokens = questioner.encode_images(_images(4))
    prompts = [build_prompt(i % NUM_TEMPLATES, 4, "I saw a man.", [], []) for i in range(3)]
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, top_p=1.0, temperature=1.5)

    def source(ids):
        return [tokens[i] for i in ids]

    result = generate_questions(questioner, prompts, [[0, 1, 2, 3]] * 3, source, [21, 22, 23],
                                cfg, samples=4)
    assert [len(s) for s in result.samples] == [4, 4, 4]
    assert result.questions == [s[0] for s in result.samples]
    # Sample k of a prompt is what one sample with seed sample_seed(seed, k) gives.
    for p, seed, drawn in zip(prompts, [21, 22, 23], result.samples, strict=True):
        alone = [generate_questions(questioner, [p], [[0, 1, 2, 3]], source,
                                    [sample_seed(seed, k)], cfg).questions[0] for k in range(4)]
        assert drawn == alone
    assert len({q for s in result.samples for q in s}) > 3  # the seeds do differ


def test_top_p_sampling_keeps_to_the_nucleus():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0, -2.0]]).repeat(400, 1)
    seeds = torch.arange(400)
    picked = choose_tokens(logits, GenerationConfig(top_p=0.6), seeds, step=0)
    assert set(picked.tolist()) == {0, 1}  # the two tokens holding > 60 % of the mass
    assert 100 < int((picked == 1).sum()) < 300
    u = hashed_uniform(seeds, 3, torch.arange(7)[None].repeat(400, 1))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.05
    greedy = choose_tokens(logits, GenerationConfig(do_sample=False), seeds, 0)
    assert set(greedy.tolist()) == {0}


def test_prefix_cache_is_computed_once_and_right_aligned_per_row(questioner):
    cache = PrefixCache(questioner)
    short = tuple(questioner.prefix_ids(build_prompt(0, 1, "I saw a man.", [], [])))
    long = tuple(questioner.prefix_ids(build_prompt(1, 1, "I saw a man.", [], [])))
    assert len(short) != len(long)
    assert cache.get(short) is cache.get(short)
    batch, mask = cache.batch_cache([short, long, short], capacity=200)
    width = max(len(short), len(long))
    assert mask.shape == (3, width)
    assert mask[0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert mask[1].sum() == len(long)
    keys = batch.layers[0].keys
    assert keys.shape[0] == 3 and keys.shape[2] == 200  # every slot allocated up front
    assert torch.equal(keys[0, :, width - len(short):width], cache.get(short).layers[0].keys[0])
    assert torch.equal(keys[1, :, width - len(long):width], cache.get(long).layers[0].keys[0])
    assert not keys[:, :, width:].any()
    assert cache.get(short).layers[0].keys.shape[0] == 1  # the shared copy is untouched


def test_visual_token_cache_round_trip_and_staleness(questioner, tmp_path):
    paths = []
    for i, img in enumerate(_images(5)):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    out = tmp_path / "vt.safetensors"
    build_cache(questioner, paths, [10, 11, 12, 13, 14], out, batch_size=2)
    cache = VisualTokenCache(out)
    assert len(cache) == 5 and 12 in cache and 99 not in cache
    direct = questioner.encode_images([Image.open(p).convert("RGB") for p in paths])
    for got, want in zip(cache.tokens([10, 11, 12, 13, 14]), direct, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    cache.check_model(questioner)
    with pytest.raises(KeyError, match="image_idx 99"):
        cache.tokens([99])
    # Training the projector changes the weights the tokens depend on: the cache is stale.
    before = weights_hash(questioner)
    proj = questioner.base.model.multi_modal_projector.linear_1
    with torch.no_grad():
        proj.bias.add_(0.01)
    try:
        assert weights_hash(questioner) != before
        with pytest.raises(Exception, match="other vision/projector weights"):
            cache.check_model(questioner)
    finally:
        with torch.no_grad():
            proj.bias.sub_(0.01)


def test_training_batch_labels_only_the_question(questioner):
    tokens = questioner.encode_images(_images(2))
    p = build_prompt(0, 2, "I saw a man.", [], [])
    batch = questioner.training_batch([p, p], [[0, 1], [1, 0]], [tokens, tokens[::-1]],
                                      ["Was he carrying a bag?", "What colour were his shoes?"])
    target = questioner.target_ids("Was he carrying a bag?")
    labelled = batch.labels[0][batch.labels[0] != -100].tolist()
    assert labelled == target and target[-1] == questioner.im_end_id
    # labels[j] predicts token j + 1: the label right before the question is its first token.
    first = int((batch.labels[0] != -100).nonzero()[0])
    assert int(batch.input_ids[0, first + 1]) == target[0]
    loss = questioner.loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0
    assert batch.seen == [[0, 1], [1, 0]]


def test_question_quality_check():
    assert is_well_formed("What colour were his shoes?")
    assert is_well_formed("Was she carrying a backpack?")
    assert not is_well_formed("What colour were his shoes")
    assert not is_well_formed("shoes shoes shoes?")
    assert not is_well_formed("What is the weather like today?")


def test_fused_elementwise_ops_compute_what_the_modules_compute(tiny_folder):
    """questioner.fused swaps RMSNorm and the SiLU-gated MLP for compiled kernels (CUDA only
    in the product); on CPU the same compiled functions must reproduce the modules."""
    from llava_reid.questioner.fused import fuse_pointwise

    q = Questioner.from_pretrained(tiny_folder, QCFG, "cpu")
    assert q.fuse_language_model() == 0  # a no-op off CUDA
    lm = q.base.model.language_model
    ids = torch.randint(0, 300, (3, 11))
    with torch.no_grad():
        before = lm(input_ids=ids).last_hidden_state
        # 2 layers x (2 norms + 1 MLP) + the final norm
        assert fuse_pointwise(lm) == 7
        after = lm(input_ids=ids).last_hidden_state
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    assert not torch.equal(before, torch.zeros_like(before))


def test_generation_runs_sdpa_whatever_the_loaded_attention(tiny_folder):
    """Generation passes boolean 4D masks, which only the SDPA path reads as given: a model
    loaded with another attention (flash-attn 2 on GPUs) is switched for the call and back."""
    q = Questioner.from_pretrained(tiny_folder, QCFG, "cpu")
    tokens = q.encode_images(_images(4))
    prompts = [build_prompt(0, 4, "I saw a man.", [], []),
               build_prompt(1, 4, "I saw a woman.", ["Did she wear a hat?"], ["No."])]
    cfg = GenerationConfig(max_new_tokens=5, do_sample=False)

    def run():
        return generate_questions(q, prompts, [[0, 1, 2, 3]] * 2,
                                  lambda ids: [tokens[i] for i in ids], [0, 1], cfg).questions

    expected = run()
    config = q.base.model.language_model.config
    config._attn_implementation = "eager"
    seen = []
    hook = q.base.model.language_model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.config._attn_implementation))
    try:
        assert run() == expected
    finally:
        hook.remove()
    assert set(seen) == {"sdpa"} and config._attn_implementation == "eager"


def test_repeat_by_gain_weights_examples_by_how_far_their_label_moved_the_target():
    from llava_reid.artifacts import ArtifactError
    from llava_reid.questioner.sft_data import Example, repeat_by_gain

    def example(i: int, gain: float) -> Example:
        return Example(i, i, 0, (0, "I saw a man.", (), ()), "Was he carrying a bag?", (i,),
                       gain)

    gains = [0.0, 0.2, 0.3, 1.0, 1.6, 9.0, -0.7]
    repeated = repeat_by_gain([example(i, g) for i, g in enumerate(gains)], unit=0.5,
                              max_repeats=4)
    # 0 -> 0, 0.2 -> 0, 0.3 -> 1, 1.0 -> 2, 1.6 -> 3, 9.0 -> 4 (capped), -0.7 -> 0
    assert [e.example_id for e in repeated] == [2, 3, 3, 4, 4, 4, 5, 5, 5, 5]
    with pytest.raises(ArtifactError, match="repeat_by_gain.unit"):
        repeat_by_gain([example(0, 0.1)], unit=0.5, max_repeats=4)
