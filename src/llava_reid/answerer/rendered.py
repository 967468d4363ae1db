"""Synthetic visual witness: answers from what the renderer drew in the target image.

The embedded default has no vision-language model to look at its synthetic pedestrians, but the
renderer knows exactly what it drew: ``llava-reid synthesize`` writes ``drawn.json`` beside the
images (image path relative to that folder -> the person's attributes). This witness finds the
target image's entry, reads which attribute the question is about from its words, and states
that attribute as the annotators would ("His shoes were white."). It never reads the
annotations' descriptions or Q/A pairs, so it behaves like the visual answerer of a transfer
run: it knows the image, nothing written about it. Questions about nothing it can recognise
get "I don't know.".
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from llava_reid.answerer.base import IDK, AnswererError, AnswerRequest, check_unique_ids, too_short
from llava_reid.answerer.visual import TargetImages
from llava_reid.data import attributes as A
from llava_reid.data.attributes import Person

DRAWN = "drawn.json"

_COLOUR_WORDS = set(A.PALETTE) | set(A.HAIR_COLOURS) | {"colour", "color", "blonde"}
_SLOT_WORDS = [  # checked in this order: the first match decides
    ("glasses", ("glasses", "eyes", "spectacles", "sunglasses")),
    ("hat", ("hat", "head", "cap", "beanie")),
    ("bag", ("bag", "backpack", "handbag", "carrying", "carry", "carried")),
    ("shoes", ("shoe", "shoes", "footwear", "feet")),
    ("hair", ("hair",)),
    ("lower", ("legs", "bottoms", "lower", "trousers", "pants", "shorts", "skirt", "jeans")),
    ("upper", ("top", "upper", "shirt", "t-shirt", "jacket", "sweater", "coat")),
]


def question_slot(question: str) -> str | None:
    """The attribute a question asks about (one of ``attributes.SLOTS``), or None."""
    words = set(re.findall(r"[a-z]+(?:-[a-z]+)?", question.lower()))
    for group, keys in _SLOT_WORDS:
        if not words & set(keys):
            continue
        if group == "hair":
            colour = bool(words & (set(A.HAIR_COLOURS) | {"colour", "color"}))
            length = bool(words & {"long", "short", "length"})
            return "hair_length" if length and not colour else "hair_colour"
        if group in ("lower", "upper"):
            return f"{group}_colour" if words & _COLOUR_WORDS else f"{group}_type"
        return group
    return None


class DrawnAttributes:
    """Image file -> the Person the renderer drew there, from the nearest ``drawn.json``."""

    def __init__(self):
        self._tables: dict[Path, dict[str, dict]] = {}

    def _table(self, folder: Path) -> dict[str, dict] | None:
        if folder not in self._tables:
            file = folder / DRAWN
            self._tables[folder] = json.loads(file.read_text()) if file.is_file() else None
        return self._tables[folder]

    def person(self, image: Path) -> Person:
        image = image.resolve()
        for folder in image.parents:
            table = self._table(folder)
            if table is not None:
                entry = table.get(image.relative_to(folder).as_posix())
                if entry is None:
                    raise AnswererError(f"{folder / DRAWN}: no entry for {image}")
                return Person(**entry)
        raise AnswererError(f"{image}: no {DRAWN} in any folder above it; the rendered "
                            f"answerer only knows images written by `llava-reid synthesize`")


class RenderedAnswerer:
    """Answers each question about the target image from the renderer's record of it."""

    name = "rendered"

    def __init__(self, images: TargetImages, idk_min_question_chars: int = 15):
        self.images = images
        self.drawn = DrawnAttributes()
        self.idk_min_question_chars = int(idk_min_question_chars)

    def answer(self, requests: Sequence[AnswerRequest]) -> list[str]:
        check_unique_ids(requests)
        out = []
        for r in requests:
            person = self.drawn.person(self.images.path(r.target_id))
            slot = None if too_short(r.question, self.idk_min_question_chars) else (
                question_slot(r.question))
            out.append(IDK if slot is None else A.statement(person, slot))
        return out

    def close(self) -> None:
        """Nothing to release."""
