"""The visual answerer against a real OpenAI-compatible server on loopback: `transformers serve`
with a tiny LLaVA (CLIP vision tower, projector, Qwen2 decoder, random weights) built and saved
here. The image must reach the model: the server's reply equals what the model generates
locally from our messages with that image (whose prompt holds the image tokens), and two
different images give different replies."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from llava_reid.answerer import AnswerRequest, build_answerer
from llava_reid.answerer.base import AnswererError
from llava_reid.answerer.prompt import clean_reply
from llava_reid.answerer.visual import (
    VISUAL_SYSTEM_PROMPT,
    TargetImages,
    VisualOpenAIAnswerer,
    build_visual_messages,
    data_url,
)
from tests.conftest import answerer_config
from tests.test_answerer import AuthProxy, TransformersServe

QUESTION = "What colour were his shoes?"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A ~40 k-parameter random LLaVA with its processor (CLIP image processor, BPE tokenizer
    with <image>, a chat template that places the image), saved like a real checkpoint."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    from llava_reid.tokenization import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tiny_vlm")
    corpus = [VISUAL_SYSTEM_PROMPT, f"Question: {QUESTION}", "His shoes were red.",
              "She wore a blue jacket and black trousers."] * 5
    tok = train_bpe_tokenizer(corpus, vocab_size=300,
                              special_tokens={"eos_token": "<|im_end|>",
                                              "pad_token": "<|endoftext|>"},
                              extra_special_tokens=["<|im_start|>", "<image>"])
    tok.chat_template = TEMPLATE
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # 16x16 images in 8x8 patches: 4 image tokens (the CLS feature is dropped).
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=TEMPLATE,
                               num_additional_image_tokens=1)
    torch.manual_seed(0)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=16, patch_size=8)
    config = LlavaConfig(text_config=text, vision_config=vision,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vlm_server(tiny_vlm, tmp_path_factory):
    srv = TransformersServe(tiny_vlm, tmp_path_factory.mktemp("serve_vlm"))
    srv.start()  # a server that cannot start fails the tests (never skips them)
    yield srv
    srv.kill()


@pytest.fixture()
def two_images(tmp_path) -> TargetImages:
    for name, colour in (("dark.png", (10, 10, 10)), ("light.jpg", (245, 240, 230))):
        Image.new("RGB", (16, 32), colour).save(tmp_path / name)
    return TargetImages.from_paths({1: tmp_path / "dark.png", 2: tmp_path / "light.jpg"})


def local_greedy(model_dir: Path, image: Path, max_new_tokens: int) -> tuple[str, int]:
    """What the tiny model generates for our messages with ``image``, computed here, and how
    many image tokens its prompt holds."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    messages = []
    for m in build_visual_messages(QUESTION, data_url(image)):
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        else:  # the processor's spelling of an image part
            content = [{"type": "image", "url": c["image_url"]["url"]} if c["type"] == "image_url"
                       else c for c in content]
        messages.append({"role": m["role"], "content": content})
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_index).sum())
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                      skip_special_tokens=True)
    return clean_reply(text), n_image


def test_data_url_and_messages(two_images):
    url = data_url(two_images.path(2))
    assert url.startswith("data:image/jpeg;base64,")
    messages = build_visual_messages(" Was he wearing a hat? ", url)
    assert messages[0] == {"role": "system", "content": VISUAL_SYSTEM_PROMPT}
    assert messages[1]["content"] == [{"type": "image_url", "image_url": {"url": url}},
                                      {"type": "text", "text": "Question: Was he wearing a hat?"}]


@pytest.mark.server
def test_image_reaches_the_model(vlm_server, tiny_vlm, two_images, monkeypatch):
    vlm_server.ensure_running()
    proxy = AuthProxy(vlm_server.base_url, key="vlm-key")
    try:
        monkeypatch.setenv("LLAVA_REID_TEST_VISUAL_KEY", "vlm-key")
        answerer = VisualOpenAIAnswerer(proxy.base_url, str(tiny_vlm), images=two_images,
                                        api_key_env="LLAVA_REID_TEST_VISUAL_KEY",
                                        max_tokens=8, max_concurrency=2)
        got = answerer.answer([AnswerRequest("1:0", 1, QUESTION, "", (), ()),
                               AnswerRequest("2:0", 2, QUESTION, "", (), ())])
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert answerer.requests_sent == 2 and answerer.name == f"openai-visual:{tiny_vlm}"
    dark, n_image = local_greedy(tiny_vlm, two_images.path(1), 8)
    light, _ = local_greedy(tiny_vlm, two_images.path(2), 8)
    assert n_image == 4  # the prompt the model saw holds the image's tokens
    assert got == [dark, light]  # the server generated from each request's own image
    assert dark != light


@pytest.mark.server
def test_visual_answerer_through_build_answerer_with_cache(vlm_server, tiny_vlm, two_images,
                                                           tmp_path):
    vlm_server.ensure_running()
    acfg = answerer_config(kind="openai", input="image",
                           openai={"base_url": vlm_server.base_url, "model": str(tiny_vlm),
                                   "max_tokens": 8})
    cache = tmp_path / "answers.parquet"
    # Queries 0 and 2 are two captions of image 1: one question to the server between them.
    reqs = [AnswerRequest(f"{q}:0", t, QUESTION, "", (), ()) for q, t in enumerate((1, 2, 1))]
    first = build_answerer(acfg, str(cache), images=two_images)
    got = first.answer([reqs[0], reqs[1]])
    first.close()
    assert first.inner.requests_sent == 2
    again = build_answerer(acfg, str(cache), images=two_images)
    assert again.answer(reqs) == [got[0], got[1], got[0]]
    assert again.inner.requests_sent == 0  # every (target image, question) came from the cache
    # kind sglang pointed at a running image-model server starts nothing and sends the image.
    sg = build_answerer({**acfg, "kind": "sglang",
                         "sglang": {**acfg["sglang"], "model_path": str(tiny_vlm)}},
                        images=two_images)
    assert sg.server is None and sg.name == f"sglang-visual:{tiny_vlm.name}"
    assert sg.answer(reqs[:2]) == got
    sg.close()


def test_missing_image_fails_before_sending(tmp_path):
    images = TargetImages.from_paths({3: tmp_path / "gone.png"})
    answerer = VisualOpenAIAnswerer("http://127.0.0.1:9/v1", "m", images=images,
                                    api_key_env=None)
    with pytest.raises(AnswererError, match=r"target image 3: image file not found: .*gone.png"):
        answerer.answer([AnswerRequest("1", 3, QUESTION, "", (), ())])
    assert answerer.requests_sent == 0
