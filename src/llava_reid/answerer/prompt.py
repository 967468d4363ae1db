"""The witness prompt for chat-completion answerers, and the clean-up of their replies.

The model plays the witness, so the memory (written in the first person, "I saw a man ...") is
turned into the second person ("You saw a man ...") and addressed to it. The fixed instruction
goes in the system message and the memory comes first in the user message, so a server with
prefix caching (SGLang's RadixAttention) reuses both across the rounds of a dialogue.
"""

from __future__ import annotations

import re

from llava_reid.answerer.base import IDK

SYSTEM_PROMPT = (
    "You are playing the part of an eyewitness. You saw one person, and an investigator is now "
    "asking you about that person to help find them in a crowd of similar-looking people. "
    "Everything you know about the person is the memory given to you; you know nothing else.\n"
    "Rules for your reply:\n"
    "- Reply with exactly one complete sentence that answers the question directly.\n"
    "- Base the reply only on your memory; add no details that it does not contain.\n"
    "- Never reply with only 'yes', 'no', an option letter or a short phrase: even for a "
    "yes/no or multiple-choice question, state the fact in a full sentence.\n"
    "- If the question asks about something your memory does not mention (an item of "
    "clothing, an accessory, a feature), take it that the person did not have it and say so."
)

USER_TEMPLATE = "Your memory of the person:\n{memory}\n\nQuestion: {question}"

# First-person forms and their second-person replacements (matched case-insensitively as whole
# words; the replacement takes the capitalisation of the matched word's first letter).
_PERSON_SWAPS = [
    (r"I\s+am", "you are"),
    (r"I['’]m", "you're"),
    (r"I\s+was", "you were"),
    (r"I['’]ve", "you've"),
    (r"I['’]d", "you'd"),
    (r"I['’]ll", "you'll"),
    (r"myself", "yourself"),
    (r"mine", "yours"),
    (r"my", "your"),
    (r"me", "you"),
    (r"I", "you"),
]
_PERSON_RE = re.compile(
    r"\b(?:" + "|".join(f"(?P<g{i}>{pat})" for i, (pat, _) in enumerate(_PERSON_SWAPS)) + r")\b",
    flags=re.IGNORECASE,
)


def _swap(match: re.Match) -> str:
    word = match.group(0)
    repl = next(r for i, (_, r) in enumerate(_PERSON_SWAPS) if match.group(f"g{i}") is not None)
    if word == "i":
        return word  # a lower-case "i" is not the pronoun
    before = match.string[: match.start()].rstrip()
    at_sentence_start = not before or before[-1] in ".!?:\"'"
    starts_upper = word[0].isupper() and not word.upper().startswith("I")
    if at_sentence_start or starts_upper:
        repl = repl[0].upper() + repl[1:]
    return repl


def to_second_person(memory: str) -> str:
    """'I saw a man ... I remember my ...' -> 'You saw a man ... You remember your ...'."""
    return _PERSON_RE.sub(_swap, memory.strip())


def build_messages(question: str, memory: str) -> list[dict[str, str]]:
    """System + user chat messages asking the witness ``question`` about its ``memory``."""
    user = USER_TEMPLATE.format(memory=to_second_person(memory), question=question.strip())
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_ANSWER_PREFIX = re.compile(r"^\s*(?:answer\s*:\s*)+", flags=re.IGNORECASE)


def clean_reply(text: str | None) -> str:
    """One line of answer: leading 'Answer:' and surrounding whitespace removed; runs of
    whitespace (newlines included) collapsed so the answer can be appended to a query. An empty
    reply becomes "I don't know."."""
    text = _ANSWER_PREFIX.sub("", text or "")
    text = " ".join(text.split())
    return text or IDK
