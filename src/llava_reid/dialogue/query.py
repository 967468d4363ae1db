"""The retriever query of a dialogue: the initial description plus each answer, cleaned.

Answers arrive in the annotators' (or an LLM's) style: "Yes, he carried a black backpack.",
"B) Her top was blue.", "I don't know." Before an answer joins the query, the style prefix
goes, sentences that only say the witness does not know go (an "I don't know" answer adds
nothing), and so does a trailing sentence cut off mid-way (LLM answers hit max_tokens).
"""

from __future__ import annotations

import re

# "Yes, " / "No. " / "Yes! " at the start of an answer.
_YES_NO = re.compile(r"^\s*(yes|no)\s*[,.!:;-]?\s+", re.IGNORECASE)
# A multiple-choice letter: "B) ", "(b) ", "C. ".
_CHOICE = re.compile(r"^\s*\(?[A-Ea-e]\)\s*|^\s*[A-E]\.\s+")
_UNKNOWN = re.compile(
    r"^(i\s+(do\s*n[o']?t|don't|dont|do not)\s+(know|remember|recall)|"
    r"i'?m\s+not\s+sure|i\s+am\s+not\s+sure|i\s+have\s+no\s+idea|not\s+sure)",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"[^.!?]+[.!?]+|[^.!?]+$")


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:] if sentence else sentence


def clean_answer(answer: str) -> str:
    """The informative part of an answer, as it is appended to the retriever query."""
    text = " ".join(answer.split())
    text = _CHOICE.sub("", text, count=1)
    text = _YES_NO.sub("", text, count=1)
    sentences = [s.strip() for s in _SENTENCE.findall(text) if s.strip()]
    if len(sentences) > 1 and sentences[-1][-1] not in ".!?":
        sentences = sentences[:-1]  # cut off mid-way
    kept = [s for s in sentences if not _UNKNOWN.match(s)]
    if not kept:
        return ""
    out = " ".join(_capitalise(s) for s in kept)
    return out if out[-1] in ".!?" else out + "."


def append_answer(query: str, answer: str) -> str:
    """``query`` followed by the cleaned ``answer`` (unchanged when it adds nothing)."""
    cleaned = clean_answer(answer)
    return f"{query.strip()} {cleaned}".strip() if cleaned else query.strip()
