"""The synthetic pedestrians' attribute vocabulary and how people talk about it.

An identity is a fixed set of attributes (``Person``). Text comes in the shapes of the
Interactive-PEDES annotations: a short, vague first-person initial description, a full
fine-grained description, and question/answer pairs about the attributes the initial
description left out, in three answer styles (yes/no with detail, descriptive, multiple
choice). Phrasings vary per image (like different annotators); the facts never do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Colour names -> RGB, chosen to stay distinguishable after downscaling and lighting changes.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 28),
    "white": (235, 235, 232),
    "grey": (128, 128, 130),
    "red": (200, 30, 35),
    "blue": (35, 70, 200),
    "green": (40, 150, 60),
    "yellow": (235, 205, 40),
    "purple": (120, 50, 160),
    "pink": (240, 130, 180),
    "brown": (120, 75, 40),
    "orange": (240, 130, 30),
}
COLOURS = list(PALETTE)
HAIR_COLOURS = {
    "black": (20, 18, 18),
    "brown": (95, 60, 30),
    "blonde": (225, 190, 110),
    "grey": (160, 160, 160),
    "red": (170, 60, 30),
}
SKIN_TONES = [(240, 205, 175), (215, 170, 130), (175, 125, 85), (120, 80, 55)]

UPPER_TYPES = ["t-shirt", "long-sleeved shirt", "jacket", "sweater"]
LOWER_TYPES = ["trousers", "shorts", "skirt", "jeans"]
BAG_TYPES = ["none", "backpack", "handbag", "shoulder bag"]
HAT_TYPES = ["none", "cap", "beanie"]
SHOE_COLOURS = ["black", "white", "brown", "red", "blue", "grey"]


@dataclass(frozen=True)
class Person:
    gender: str  # "man" | "woman"
    hair_length: str  # "short" | "long"
    hair_colour: str
    skin: int  # index into SKIN_TONES
    upper_type: str
    upper_colour: str
    lower_type: str
    lower_colour: str
    shoes: str
    bag: str
    bag_colour: str  # "" when no bag
    hat: str
    hat_colour: str  # "" when no hat
    glasses: bool

    @property
    def key(self) -> tuple:
        """What makes two identities distinguishable in text (skin tone is not described)."""
        return (self.gender, self.hair_length, self.hair_colour, self.upper_type,
                self.upper_colour, self.lower_type, self.lower_colour, self.shoes, self.bag,
                self.bag_colour, self.hat, self.hat_colour, self.glasses)

    @property
    def he(self) -> str:
        return "he" if self.gender == "man" else "she"

    @property
    def his(self) -> str:
        return "his" if self.gender == "man" else "her"

    @property
    def him(self) -> str:
        return "him" if self.gender == "man" else "her"


def sample_person(rng: np.random.Generator, gender: str | None = None) -> Person:
    drawn = "man" if rng.random() < 0.5 else "woman"
    gender = gender or drawn  # drawn either way: the random stream stays the same
    long_hair_p = 0.15 if gender == "man" else 0.75
    lower_types = LOWER_TYPES if gender == "woman" else ["trousers", "shorts", "jeans"]
    bag = str(rng.choice(BAG_TYPES, p=[0.4, 0.25, 0.15, 0.2]))
    hat = str(rng.choice(HAT_TYPES, p=[0.6, 0.25, 0.15]))
    upper_colour = str(rng.choice(COLOURS))
    lower_colour = str(rng.choice([c for c in COLOURS if c != upper_colour]))
    return Person(
        gender=gender,
        hair_length="long" if rng.random() < long_hair_p else "short",
        hair_colour=str(rng.choice(list(HAIR_COLOURS))),
        skin=int(rng.integers(len(SKIN_TONES))),
        upper_type=str(rng.choice(UPPER_TYPES)),
        upper_colour=upper_colour,
        lower_type=str(rng.choice(lower_types)),
        lower_colour=lower_colour,
        shoes=str(rng.choice(SHOE_COLOURS)),
        bag=bag,
        bag_colour=str(rng.choice(COLOURS)) if bag != "none" else "",
        hat=hat,
        hat_colour=str(rng.choice(COLOURS)) if hat != "none" else "",
        glasses=bool(rng.random() < 0.3),
    )


# ---------------------------------------------------------------------------------------
# Noun phrases

def upper_phrase(p: Person) -> str:
    return f"{p.upper_colour} {p.upper_type}"


def lower_phrase(p: Person) -> str:
    return f"{p.lower_colour} {p.lower_type}"


def plural(garment: str) -> bool:
    return garment in ("trousers", "shorts", "jeans")


def were(garment: str) -> str:
    return "were" if plural(garment) else "was"


def bag_phrase(p: Person) -> str:
    return f"{p.bag_colour} {p.bag}"


def hat_phrase(p: Person) -> str:
    return f"{p.hat_colour} {p.hat}"


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


# ---------------------------------------------------------------------------------------
# Descriptions

# What an initial description may say besides the gender: garment facts. Two facts match a
# handful of identities in a gallery of a few hundred (vague, as a witness's first words are);
# three match one or two. The default draws each record's facts from these sets (config
# ``data.synthetic.initial_facts`` overrides them).
GARMENT_FACTS = ("upper_colour", "upper_type", "lower_colour", "lower_type")
INITIAL_FACTS = (
    ("upper_colour", "upper_type"),
    ("upper_colour", "lower_type"),
    ("lower_colour", "lower_type"),
)


def check_fact_set(facts: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A valid fact set for ``initial_description`` (a lower colour is said with its type)."""
    unknown = [f for f in facts if f not in GARMENT_FACTS]
    if not facts or unknown or len(set(facts)) != len(facts):
        raise ValueError(f"initial facts {list(facts)}: need distinct names from "
                         f"{list(GARMENT_FACTS)}")
    if "lower_colour" in facts and "lower_type" not in facts:
        raise ValueError(f"initial facts {list(facts)}: lower_colour needs lower_type")
    return tuple(facts)


def initial_description(p: Person, facts: tuple[str, ...], rng: np.random.Generator) -> str:
    """First-person, vague: the gender plus the given garment facts."""
    parts = []
    if "upper_colour" in facts and "upper_type" in facts:
        parts.append(_a(upper_phrase(p)))
    elif "upper_colour" in facts:
        parts.append(_a(f"{p.upper_colour} top"))
    elif "upper_type" in facts:
        parts.append(_a(p.upper_type))
    if "lower_type" in facts:
        lower = lower_phrase(p) if "lower_colour" in facts else p.lower_type
        parts.append(lower if plural(p.lower_type) else _a(lower))
    clothes = " and ".join(parts)
    who = _a(p.gender)
    templates = [
        f"I saw {who} in {clothes}.",
        f"I saw {who} wearing {clothes}.",
        f"There was {who} in {clothes}.",
        f"I remember {who} who wore {clothes}.",
    ]
    return templates[int(rng.integers(len(templates)))]


def slots_of(facts: tuple[str, ...]) -> set[str]:
    """Question slots an initial description with ``facts`` already answers."""
    return set(facts)


def _hair_sentence(p: Person, rng) -> str:
    return [f"{p.he.capitalize()} had {p.hair_length} {p.hair_colour} hair.",
            f"{p.his.capitalize()} hair was {p.hair_colour} and {p.hair_length}."][
        int(rng.integers(2))]


def _extras(p: Person) -> list[str]:
    out = []
    out.append(f"{p.he} carried {_a(bag_phrase(p))}" if p.bag != "none"
               else f"{p.he} carried no bag")
    out.append(f"{p.he} wore {_a(hat_phrase(p))}" if p.hat != "none"
               else f"{p.he} had no hat")
    out.append(f"{p.he} wore glasses" if p.glasses else f"{p.he} did not wear glasses")
    return out


def fine_grained_description(p: Person, rng: np.random.Generator) -> str:
    """First-person, every attribute; sentence order and wording vary."""
    lower = lower_phrase(p) if plural(p.lower_type) else _a(lower_phrase(p))
    clothes = [
        f"{p.he.capitalize()} wore {_a(upper_phrase(p))}, {lower} and {p.shoes} shoes.",
        f"{p.he.capitalize()} was dressed in {_a(upper_phrase(p))} with {lower}, "
        f"and {p.his} shoes were {p.shoes}.",
    ][int(rng.integers(2))]
    opening = [f"I saw {_a(p.gender)} with {p.hair_length} {p.hair_colour} hair.",
               f"I saw {_a(p.gender)}."][int(rng.integers(2))]
    sentences = [clothes]
    if opening.endswith(f"{p.gender}."):
        sentences.insert(0, _hair_sentence(p, rng))
    extras = [e[0].upper() + e[1:] + "." for e in _extras(p)]
    order = rng.permutation(len(extras))
    sentences += [extras[i] for i in order]
    return " ".join([opening, *sentences])


def caption(p: Person) -> str:
    """A neutral third-person caption, as in the source datasets' human captions."""
    lower = lower_phrase(p) if plural(p.lower_type) else _a(lower_phrase(p))
    text = (f"A {p.gender} with {p.hair_length} {p.hair_colour} hair wearing "
            f"{_a(upper_phrase(p))}, {lower} and {p.shoes} shoes")
    if p.bag != "none":
        text += f", carrying {_a(bag_phrase(p))}"
    return text + "."


# ---------------------------------------------------------------------------------------
# Questions and answers

SLOTS = ("hair_colour", "hair_length", "upper_type", "upper_colour", "lower_type",
         "lower_colour", "shoes", "bag", "hat", "glasses")


def _slot_value(p: Person, slot: str) -> str:
    return {
        "hair_colour": p.hair_colour, "hair_length": p.hair_length,
        "upper_type": p.upper_type, "upper_colour": p.upper_colour,
        "lower_type": p.lower_type, "lower_colour": p.lower_colour,
        "shoes": p.shoes, "bag": p.bag, "hat": p.hat, "glasses": str(p.glasses),
    }[slot]


def _options(slot: str, p: Person) -> list[str]:
    return {
        "hair_colour": list(HAIR_COLOURS), "hair_length": ["short", "long"],
        "upper_type": UPPER_TYPES, "upper_colour": COLOURS,
        "lower_type": LOWER_TYPES if p.gender == "woman" else ["trousers", "shorts", "jeans"],
        "lower_colour": COLOURS, "shoes": SHOE_COLOURS,
    }[slot]


def statement(p: Person, slot: str) -> str:
    """The fact of ``slot`` as a sentence (what every answer style ends up saying)."""
    he, his = p.he, p.his
    if slot == "hair_colour":
        return f"{his.capitalize()} hair was {p.hair_colour}."
    if slot == "hair_length":
        return f"{his.capitalize()} hair was {p.hair_length}."
    if slot == "upper_type":
        return f"{he.capitalize()} wore {_a(p.upper_type)} on top."
    if slot == "upper_colour":
        return f"{his.capitalize()} {p.upper_type} was {p.upper_colour}."
    if slot == "lower_type":
        w = p.lower_type if plural(p.lower_type) else _a(p.lower_type)
        return f"{he.capitalize()} wore {w}."
    if slot == "lower_colour":
        return f"{his.capitalize()} {p.lower_type} {were(p.lower_type)} {p.lower_colour}."
    if slot == "shoes":
        return f"{his.capitalize()} shoes were {p.shoes}."
    if slot == "bag":
        return (f"{he.capitalize()} carried {_a(bag_phrase(p))}." if p.bag != "none"
                else f"{he.capitalize()} did not carry a bag.")
    if slot == "hat":
        return (f"{he.capitalize()} wore {_a(hat_phrase(p))}." if p.hat != "none"
                else f"{he.capitalize()} did not wear a hat.")
    if slot == "glasses":
        return (f"{he.capitalize()} wore glasses." if p.glasses
                else f"{he.capitalize()} did not wear glasses.")
    raise KeyError(slot)


def _lower_first(sentence: str) -> str:
    return sentence[0].lower() + sentence[1:]


def descriptive_question(p: Person, slot: str, rng) -> str:
    he, his = p.he, p.his
    options = {
        "hair_colour": [f"What colour was {his} hair?", f"What was {his} hair colour?"],
        "hair_length": [f"How long was {his} hair?", f"Was {his} hair short or long?"],
        "upper_type": [f"What did {he} wear on {his} upper body?",
                       f"What kind of top was {he} wearing?"],
        "upper_colour": [f"What colour was {his} {p.upper_type}?",
                         f"What colour was the top {he} wore?"],
        "lower_type": [f"What did {he} wear on {his} legs?",
                       f"What kind of bottoms did {he} have on?"],
        "lower_colour": [f"What colour {were(p.lower_type)} {his} {p.lower_type}?",
                         f"What colour were the clothes on {his} lower body?"],
        "shoes": [f"What colour were {his} shoes?", f"What shoes was {he} wearing?"],
        "bag": [f"What kind of bag did {he} carry, if any?",
                f"Was {he} carrying anything, like a bag?"],
        "hat": [f"What did {he} wear on {his} head?", f"Did {he} have anything on {his} head?"],
        "glasses": [f"Did anything cover {his} eyes, like glasses?",
                    f"What about {his} eyes, any glasses?"],
    }[slot]
    return options[int(rng.integers(len(options)))]


def descriptive_answer(p: Person, slot: str) -> str:
    return statement(p, slot)


def yes_no(p: Person, slot: str, rng) -> tuple[str, str]:
    """A yes/no question whose answer adds the detail ("No, his shoes were white.")."""
    he, his = p.he, p.his
    if slot in ("bag", "hat", "glasses"):
        q = {
            "bag": [f"Was {he} carrying a bag?", f"Did {he} have a bag with {p.him}?"],
            "hat": [f"Was {he} wearing a hat?", f"Did {he} wear anything on {his} head?"],
            "glasses": [f"Was {he} wearing glasses?", f"Did {he} wear glasses?"],
        }[slot]
        present = {"bag": p.bag != "none", "hat": p.hat != "none", "glasses": p.glasses}[slot]
        question = q[int(rng.integers(len(q)))]
        return question, ("Yes, " if present else "No, ") + _lower_first(statement(p, slot))
    truth = _slot_value(p, slot)
    options = _options(slot, p)
    asked = truth if rng.random() < 0.5 else str(rng.choice([o for o in options if o != truth]))
    question = {
        "hair_colour": f"Was {his} hair {asked}?",
        "hair_length": f"Did {he} have {asked} hair?",
        "upper_type": f"Was {he} wearing {_a(asked)}?",
        "upper_colour": f"Was {his} {p.upper_type} {asked}?",
        "lower_type": f"Did {he} wear {asked if plural(asked) else _a(asked)}?",
        "lower_colour": f"{were(p.lower_type).capitalize()} {his} {p.lower_type} {asked}?",
        "shoes": f"Were {his} shoes {asked}?",
    }[slot]
    return question, ("Yes, " if asked == truth else "No, ") + _lower_first(statement(p, slot))


LETTERS = "ABC"


def multiple_choice(p: Person, slot: str, rng) -> tuple[str, str] | None:
    if slot in ("bag", "hat", "glasses"):
        return None
    truth = _slot_value(p, slot)
    wrong = [o for o in _options(slot, p) if o != truth]
    k = min(2, len(wrong))
    picks = [truth, *rng.choice(wrong, size=k, replace=False).tolist()]
    picks = [picks[i] for i in rng.permutation(len(picks))]
    listed = ", ".join(picks[:-1]) + f" or {picks[-1]}"
    subject = {
        "hair_colour": f"{p.his} hair", "hair_length": f"{p.his} hair",
        "upper_type": f"{p.his} top", "upper_colour": f"{p.his} {p.upper_type}",
        "lower_type": f"{p.his} bottoms", "lower_colour": f"{p.his} {p.lower_type}",
        "shoes": f"{p.his} shoes",
    }[slot]
    verb = "were" if slot in ("shoes", "lower_type") or (
        slot == "lower_colour" and plural(p.lower_type)) else "was"
    choices = " ".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(picks))
    question = f"{verb.capitalize()} {subject} {listed}? {choices}"
    letter = LETTERS[picks.index(truth)]
    return question, f"{letter}) {statement(p, slot)}"


def question_answer(p: Person, slot: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """One Q/A pair about ``slot``: (style, question, answer); styles ~40/50/10 %."""
    u = rng.random()
    if u < 0.1:
        mc = multiple_choice(p, slot, rng)
        if mc is not None:
            return ("choice", *mc)
    if u < 0.5:
        return ("yes_no", *yes_no(p, slot, rng))
    return ("descriptive", descriptive_question(p, slot, rng), descriptive_answer(p, slot))
