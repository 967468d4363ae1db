"""Witness played by a vision-language model that looks at the target image.

For the caption benchmarks (transfer) there is no written memory: the answerer sees the target
image itself. Each question is one chat-completions request whose user message carries the
image as a base64 data URL (``{"type": "image_url", "image_url": {"url": "data:image/...;
base64,..."}}``) followed by the question, the shape SGLang, vLLM and ``transformers serve``
take for LLaVA-OneVision, Qwen2-VL and the like. Everything else (concurrency, retries, the key
from the environment, errors, the answer cache) is the text answerer's
(``OpenAIAnswerer``).
"""

from __future__ import annotations

import base64
import functools
import mimetypes
import os
from collections.abc import Sequence
from pathlib import Path

from llava_reid.answerer.base import AnswererError, AnswerRequest
from llava_reid.answerer.openai_compat import OpenAIAnswerer

VISUAL_SYSTEM_PROMPT = (
    "You are looking at a photo of one person. An investigator asks you about this person to "
    "help find them in a crowd of similar-looking people.\n"
    "Rules for your reply:\n"
    "- Reply with exactly one complete sentence that answers the question directly.\n"
    "- Describe only what you can see in the photo; add nothing you cannot see.\n"
    "- Never reply with only 'yes', 'no', an option letter or a short phrase: even for a "
    "yes/no or multiple-choice question, state the fact in a full sentence.\n"
    "- If the question asks about something the person does not have (an item of clothing, "
    "an accessory), say that they do not have it."
)


class TargetImages:
    """image_idx -> the image file of that gallery image (annotations' file_path under the
    image root)."""

    def __init__(self, annotations: str | os.PathLike, image_root: str | os.PathLike):
        from llava_reid.data.annotations import read_annotations

        rows = read_annotations(annotations)
        self.root = Path(image_root)
        self.paths = dict(zip(rows.image_idx.astype(int), rows.file_path, strict=True))

    @classmethod
    def from_paths(cls, paths: dict[int, str | os.PathLike]) -> TargetImages:
        self = cls.__new__(cls)
        self.root, self.paths = Path(), {int(k): str(v) for k, v in paths.items()}
        return self

    def path(self, target_id: int) -> Path:
        if int(target_id) not in self.paths:
            raise AnswererError(f"target image {target_id} is not in the annotations")
        file = self.root / self.paths[int(target_id)]
        if not file.is_file():
            raise AnswererError(f"target image {target_id}: image file not found: {file}")
        return file


@functools.lru_cache(maxsize=256)
def data_url(path: Path) -> str:
    """The image file as a base64 data URL (the file's own bytes, no re-encoding)."""
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def build_visual_messages(question: str, image_url: str) -> list[dict]:
    """System + user messages: the image, then the question."""
    return [
        {"role": "system", "content": VISUAL_SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": f"Question: {question.strip()}"},
        ]},
    ]


class VisualOpenAIAnswerer(OpenAIAnswerer):
    """``OpenAIAnswerer`` that sends the target image (``images``) instead of the memory."""

    def __init__(self, base_url: str, model: str, *, images: TargetImages, **kwargs):
        kwargs.setdefault("name", f"openai-visual:{model}")
        super().__init__(base_url, model, **kwargs)
        self.images = images

    def _messages(self, req: AnswerRequest) -> list[dict]:
        return build_visual_messages(req.question, data_url(self.images.path(req.target_id)))

    def answer(self, requests: Sequence[AnswerRequest]) -> list[str]:
        for r in requests:  # a missing image fails here, before any request is sent
            self.images.path(r.target_id)
        return super().answer(requests)
