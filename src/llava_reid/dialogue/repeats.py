"""When a question asks again what the dialogue already asked.

A witness asked twice about the same thing gives the same answer, so the round is wasted. Exact
text match misses most repeats of a small questioner ("What colour were her hair?" after "What
colour was her hair?"; "What shoes was he wearing?" after "What colour were his shoes?"), so
questions are compared by their content words: lower-cased words of three or more letters
without the function words and verbs every question shares. Words that name a value of an
attribute stand for the attribute they ask about: any colour word is "<colour>", any length
word "<length>", so "Was his hair blonde?" repeats "What colour was his hair?" and "Did she
have short hair?" repeats "How long was her hair?", while hair colour and hair length stay
apart; words for the same item share one ("hat", "cap", "head" -> "<headwear>"). Two
questions are repeats when the Jaccard overlap of their content words reaches
``REPEAT_OVERLAP``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REPEAT_OVERLAP = 0.5

FUNCTION_WORDS = frozenset({
    "about", "and", "any", "anything", "are", "can", "could", "did", "does", "for", "from",
    "had", "has", "have", "her", "hers", "him", "his", "how", "like", "not", "one", "she",
    "that", "the", "their", "them", "there", "these", "they", "this", "those", "was", "wear",
    "wearing", "were", "what", "whether", "which", "who", "with", "wore", "worn", "you", "your",
    "kind", "type", "sort", "carry", "carrying", "carried", "hold", "holding", "held",
})

# Attribute values -> the attribute a question asks about when it names one.
ATTRIBUTE_OF = {w: "<colour>" for w in (
    "colour", "color", "coloured", "colored", "black", "white", "grey", "gray", "red", "blue",
    "green", "yellow", "purple", "pink", "brown", "orange", "blonde", "blond", "beige", "navy",
    "khaki", "violet", "silver", "gold", "golden", "dark", "light")}
ATTRIBUTE_OF |= {w: "<length>" for w in ("long", "short", "length", "medium")}
# Words for the same item: "Was she wearing a hat?" asks what "anything on her head?" asked.
ATTRIBUTE_OF |= {w: "<headwear>" for w in ("head", "hat", "hats", "cap", "caps", "beanie",
                                          "headwear", "helmet", "hood")}
ATTRIBUTE_OF |= {w: "<eyewear>" for w in ("glasses", "sunglasses", "spectacles", "eyes",
                                         "eyewear")}
ATTRIBUTE_OF |= {w: "<bag>" for w in ("bag", "bags", "backpack", "handbag", "purse",
                                     "satchel")}
ATTRIBUTE_OF |= {w: "<footwear>" for w in ("shoes", "shoe", "sneakers", "boots", "footwear",
                                          "sandals")}


def plain_content_words(text: str) -> frozenset[str]:
    """Lower-cased words of three or more letters, without the function words."""
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower())
                     if len(w) >= 3 and w not in FUNCTION_WORDS)


def content_words(text: str) -> frozenset[str]:
    """The plain content words with attribute values and item synonyms folded."""
    return frozenset(ATTRIBUTE_OF.get(w, w) for w in plain_content_words(text))


def overlap(a: str, b: str) -> float:
    """Jaccard overlap of two questions' content words (1.0 when both have none)."""
    wa, wb = content_words(a), content_words(b)
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def repeat_score(question: str, earlier: Iterable[str]) -> float:
    """The largest overlap of ``question`` with an earlier question (0.0 with none)."""
    return max((overlap(question, e) for e in earlier), default=0.0)


def is_repeat(question: str, earlier: Iterable[str]) -> bool:
    return repeat_score(question, earlier) >= REPEAT_OVERLAP
