"""When a question asks again what the dialogue already asked, or what the witness said.

A witness asked twice about the same thing gives the same answer, so the round is wasted. Exact
text match misses most repeats of a small questioner ("What colour were her hair?" after "What
colour was her hair?"; "What shoes was he wearing?" after "What colour were his shoes?"), so
questions are compared by their content words: lower-cased words of three or more letters
without the function words and verbs every question shares. Words that name a value of an
attribute stand for the attribute they ask about: any colour word is "<colour>", any length
word "<length>", so "Was his hair blonde?" repeats "What colour was his hair?" and "Did she
have short hair?" repeats "How long was her hair?", while hair colour and hair length stay
apart; words for the same item share one ("hat", "cap", "head" -> "<headwear>"; "jacket",
"top" -> "<upper>"). Two
questions are repeats when the Jaccard overlap of their content words reaches
``REPEAT_OVERLAP``.

A question can also ask what the witness has already said without any earlier question
("What colour was her jacket?" after "I saw a woman in a black jacket and trousers."). The
witness's words are read as facts: within each clause (split at punctuation and "and"; a
clause naming no item belongs to the one before, as in "her hair was brown and short") every
item word is paired with every attribute the clause gives a value of ("black jacket" ->
(jacket, <colour>)). A question asks what was said when every (item, attribute) pair it names
is among them; a question that names no attribute ("What kind of top?") is never counted, so
"What colour were her trousers?" after "a black jacket and trousers" stays open.
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
    # "her lower body" is the lower garment, "a long-sleeved shirt" a shirt (not a length).
    "body", "long-sleeved", "short-sleeved", "sleeved", "sleeveless",
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
# One upper and one lower garment: "What colour was the top?" asks what "a black jacket" said.
ATTRIBUTE_OF |= {w: "<upper>" for w in ("upper", "t-shirt", "t-shirts", "top", "tops", "jacket",
                                       "jackets", "sweater", "sweaters", "shirt", "shirts",
                                       "blouse", "coat", "hoodie", "jumper", "cardigan")}
ATTRIBUTE_OF |= {w: "<lower>" for w in ("lower", "legs", "bottoms", "bottom", "trousers", "pants",
                                       "jeans", "shorts", "skirt", "skirts", "leggings")}
# Clothes in general: a word of its own, but no item once a question names one ("the clothes
# on her lower body" asks about the lower garment).
CLOTHES = "<clothes>"
ATTRIBUTE_OF |= {w: CLOTHES for w in ("clothes", "clothing", "outfit", "garment", "garments")}


# The attributes a clause can give a value of, and a question can ask for.
ATTRIBUTES = frozenset({"<colour>", "<length>"})


# Item synonyms only (no attribute values): "skirt" and "trousers" name the lower garment.
ITEM_OF = {w: tag for w, tag in ATTRIBUTE_OF.items() if tag not in ATTRIBUTES}


# The items a person is described by: folded item words and the hair.
ITEMS = frozenset({*ITEM_OF.values(), "hair"}) - {CLOTHES}


def named_items(words: frozenset[str]) -> frozenset[str]:
    """The items among a text's content words."""
    return words & ITEMS


def names_one_item(question: str) -> bool:
    """Whether a question asks about exactly one item, as every annotated question does. A
    small questioner's hot samples name none ("What colour were theStudy?") or several ("What
    shoes was she wear on her lower body?"); whatever the witness answers to those, it is not
    an answer to a question about one thing."""
    return len(named_items(content_words(question))) == 1


def plain_content_words(text: str) -> frozenset[str]:
    """Lower-cased words of three or more letters, without the function words. A hyphenated
    word is one word when it is known ("t-shirt", "long-sleeved"), else its parts
    ("long-shirt" -> "long", "shirt")."""
    words = []
    for word in re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower()):
        known = word in ATTRIBUTE_OF or word in FUNCTION_WORDS
        words += [word] if known or "-" not in word else word.split("-")
    return frozenset(w for w in words if len(w) >= 3 and w not in FUNCTION_WORDS)


def item_words(text: str) -> frozenset[str]:
    """The plain content words with item synonyms folded, attribute values kept."""
    return frozenset(ITEM_OF.get(w, w) for w in plain_content_words(text))


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


def facts(words: frozenset[str]) -> set[tuple[str, str]]:
    """(item, attribute) pairs of one clause's or question's content words."""
    attributes = words & ATTRIBUTES
    items = words - ATTRIBUTES
    if len(items) > 1:
        items -= {CLOTHES}
    return {(item, attribute) for item in items for attribute in attributes}


def stated_facts(statements: Iterable[str]) -> set[tuple[str, str]]:
    """The (item, attribute) pairs the witness's statements give values of."""
    out: set[tuple[str, str]] = set()
    for statement in statements:
        clauses: list[frozenset[str]] = []
        for part in re.split(r"[.,;:!?]|\band\b", statement.lower()):
            words = content_words(part)
            if clauses and not words - ATTRIBUTES:  # no item: the previous clause's values
                clauses[-1] = clauses[-1] | words
            elif words:
                clauses.append(words)
        for words in clauses:
            out |= facts(words)
    return out


def asks_what_was_said(question: str, statements: Iterable[str]) -> bool:
    """Whether every (item, attribute) pair ``question`` names was already stated."""
    asked = facts(content_words(question))
    return bool(asked) and asked <= stated_facts(statements)
