"""The answerer: the witness who holds the full memory of the target and answers questions.

``build_answerer(config["answerer"], cache_path, seed)`` returns one of

- ``annotated`` (default, no LLM): the annotated answer of the most similar annotated question;
- ``openai``: any OpenAI-compatible chat-completions server (SGLang, vLLM, transformers serve);
- ``sglang``: the same client, with the SGLang server started (and stopped) by this process;
- ``rendered`` (synthetic data only, no model): what the renderer drew in the target image;

``openai`` and ``sglang`` answer from the written memory, or, with ``answerer.input: image``,
from the target image sent to a vision-language model (``images`` maps target ids to files);

wrapped in a persistent ``CachedAnswerer`` when ``cache_path`` is given. All share the
``Answerer`` protocol: ``answer(requests) -> answers`` in request order, and ``close()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_reid.answerer.base import (
    IDK,
    AnswerBatchError,
    Answerer,
    AnswererError,
    AnswerRequest,
    request_settings,
)

__all__ = [
    "IDK",
    "AnswerBatchError",
    "AnswerRequest",
    "Answerer",
    "AnswererError",
    "build_answerer",
]

KINDS = ("annotated", "openai", "sglang", "rendered")


def looks_at_image(acfg: dict[str, Any]) -> bool:
    """Whether the configured answerer answers from the target image (needs the images)."""
    return acfg.get("kind") == "rendered" or acfg.get("input", "memory") == "image"


def build_answerer(acfg: dict[str, Any], cache_path: str | None = None, seed: int = 0,
                   images: Any = None, question_bank: Any = None) -> Answerer:
    """The answerer described by the config section ``answerer``, validated: every key the
    workflow schema requires is present (the schema and config.yaml hold the defaults).

    ``images`` (a ``visual.TargetImages``) is needed when the answerer looks at the target
    image; ``question_bank`` (the split's annotated (question, answer) pairs) by the annotated
    answerer's lexical check. Heavy imports (torch, transformers) happen only for the kind
    that needs them.
    """
    kind = acfg["kind"]
    min_chars = int(acfg["idk_min_question_chars"])
    ocfg = acfg["openai"]
    visual = looks_at_image(acfg)
    if visual and images is None:
        raise ValueError(f"answerer kind {kind!r} with input 'image' answers from the target "
                         f"image, but no image root was given (evaluate --image-root)")
    if visual and kind == "annotated":
        raise ValueError("answerer.kind 'annotated' answers from the annotations; with "
                         "answerer.input 'image' use kind openai, sglang or rendered")
    inner: Answerer
    if kind == "annotated":
        from llava_reid.answerer.annotated import AnnotatedAnswerer

        ann = acfg["annotated"]
        inner = AnnotatedAnswerer(ann["encoder"], threshold=ann["threshold"],
                                  idk_min_question_chars=min_chars,
                                  lexical_ratio=ann["lexical_ratio"],
                                  question_bank=question_bank)
    elif kind == "rendered":
        from llava_reid.answerer.rendered import RenderedAnswerer

        inner = RenderedAnswerer(images, idk_min_question_chars=min_chars)
    elif kind == "openai":
        from llava_reid.answerer.openai_compat import OpenAIAnswerer
        from llava_reid.answerer.visual import VisualOpenAIAnswerer

        client, extra = (VisualOpenAIAnswerer, {"images": images}) if visual else (
            OpenAIAnswerer, {})
        inner = client(
            ocfg["base_url"], ocfg["model"], **extra, api_key_env=ocfg["api_key_env"],
            **request_settings(ocfg), idk_min_question_chars=min_chars, seed=seed)
    elif kind == "sglang":
        from llava_reid.answerer.sglang import SGLangAnswerer

        log_path = Path(cache_path).with_suffix(".sglang-server.log") if cache_path else None
        inner = SGLangAnswerer(acfg["sglang"], ocfg, idk_min_question_chars=min_chars,
                               seed=seed, log_path=log_path, images=images if visual else None)
    else:
        raise ValueError(f"unknown answerer.kind {kind!r}; expected one of {KINDS}")
    if cache_path is None:
        return inner
    from llava_reid.answerer.cache import CachedAnswerer

    try:
        return CachedAnswerer(inner, cache_path)
    except Exception:
        inner.close()  # do not leave a self-started server behind
        raise
