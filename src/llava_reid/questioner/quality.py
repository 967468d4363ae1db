"""Is a generated question a well-formed question about a person's appearance?

Used to report how sensible a trained questioner's greedy questions are on held-out prompts:
a question counts when it starts with an interrogative or auxiliary word, ends with a question
mark, has 3 to 40 words and names an appearance attribute (clothing, colour, hair, accessories).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

OPENERS = {
    "what", "which", "who", "how", "where", "when", "why", "was", "were", "is", "are", "did",
    "do", "does", "had", "has", "have", "could", "can", "would",
}
ATTRIBUTE_WORDS = {
    "hair", "top", "shirt", "t-shirt", "jacket", "coat", "sweater", "hoodie", "dress", "skirt",
    "trousers", "pants", "jeans", "shorts", "bottoms", "legs", "shoes", "sneakers", "boots",
    "bag", "backpack", "handbag", "carrying", "carry", "hat", "cap", "beanie", "head", "glasses",
    "eyes", "colour", "color", "sleeves", "sleeved", "upper", "lower", "body", "wearing", "wear",
    "wore", "clothes", "black", "white", "grey", "gray", "red", "blue", "green", "yellow",
    "purple", "pink", "brown", "orange", "blonde", "long", "short",
}
_WORD = re.compile(r"[a-z][a-z\-]*")


def is_well_formed(question: str) -> bool:
    words = _WORD.findall(question.lower())
    if not 3 <= len(words) <= 40 or not question.rstrip().endswith("?"):
        return False
    return words[0] in OPENERS and any(w in ATTRIBUTE_WORDS for w in words)


def well_formed_fraction(questions: Sequence[str]) -> float:
    return sum(map(is_well_formed, questions)) / len(questions) if questions else 0.0
