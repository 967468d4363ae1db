"""The questioner's prompt: ChatML with our own wording, as a sequence of text and image parts.

Layout (one user turn, then the assistant's question)::

    <|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{PREAMBLE[t]}      <- shared prefix
    [Candidate person] <image>\n[Similar persons] #1: <image>\n#2: <image> ...   <- per dialogue
    [Conversation] Witness: {initial}\nYou: {Q1}\nWitness: {A1} ...
    {INSTRUCTION[t]}<|im_end|>\n<|im_start|>assistant\n

The fixed instructions (system message and the template's preamble, which explains the three
sections) come BEFORE the images, so every prompt of one template starts with the same tokens
and their KV is computed once and shared across a batch. The short closing instruction after
the dialogue asks for one distinguishing question and says not to repeat questions the witness
could not answer. Three templates with different wording; the template is a seeded choice.

The prompt is returned as ``PromptParts``: text pieces with image slots between them, so the
model code decides how many tokens each image takes (its own token layout, not a processor's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"

SYSTEM = (
    "You help a witness find one specific person among many pedestrian photos by asking "
    "them questions."
)

PREAMBLES = (
    "You will see the candidate person who best matches the witness so far, then a few "
    "similar-looking persons, then the conversation with the witness.\n",
    "Below are: [Candidate person], the photo that fits the witness's words best; "
    "[Similar persons], photos that also fit but less well; [Conversation], what the witness "
    "said and the questions already asked.\n",
    "Study the candidate, the look-alikes and the dialogue that follow. Your goal is to tell "
    "the candidate apart from the look-alikes.\n",
)

INSTRUCTIONS = (
    "Ask the witness one question that would tell the candidate apart from the similar "
    "persons. Do not ask again about anything the witness answered with \"I don't know\".",
    "Write a single question for the witness whose answer separates the candidate from the "
    "others. Skip topics the witness could not answer before.",
    "What should we ask the witness next to distinguish the candidate from the look-alikes? "
    "Give one question only, and avoid questions already answered with \"I don't know\".",
)

NUM_TEMPLATES = len(PREAMBLES)
assert len(INSTRUCTIONS) == NUM_TEMPLATES


@dataclass(frozen=True)
class PromptParts:
    """``texts[0] <img 0> texts[1] <img 1> ... texts[n]``: len(texts) == num_images + 1.

    ``prefix_len`` is how many leading characters of ``texts[0]`` are shared by every prompt
    of the same template (the cacheable prefix)."""

    texts: tuple[str, ...]
    template_id: int
    prefix_len: int

    @property
    def num_images(self) -> int:
        return len(self.texts) - 1

    def as_text(self) -> str:
        """The prompt with ``<image>`` where each image goes (for logs and inspection)."""
        return IMAGE_TOKEN.join(self.texts)


def shared_prefix(template_id: int) -> str:
    """The text every prompt of ``template_id`` starts with."""
    return (
        f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{PREAMBLES[template_id]}"
    )


def dialogue_text(initial: str, questions: Sequence[str], answers: Sequence[str]) -> str:
    lines = [f"Witness: {initial.strip()}"]
    for q, a in zip(questions, answers, strict=True):
        lines += [f"You: {q.strip()}", f"Witness: {a.strip()}"]
    return "\n".join(lines)


def build_prompt(
    template_id: int,
    num_images: int,
    initial: str,
    questions: Sequence[str],
    answers: Sequence[str],
) -> PromptParts:
    """The user turn for ``num_images`` candidates (the first is the candidate person) and the
    dialogue so far, ending with the assistant header (generation starts right after)."""
    if not 0 <= template_id < NUM_TEMPLATES:
        raise ValueError(f"template_id {template_id} not in [0, {NUM_TEMPLATES})")
    if num_images < 1:
        raise ValueError("the questioner needs at least the candidate image")
    prefix = shared_prefix(template_id)
    texts = [f"{prefix}[Candidate person] "]
    if num_images > 1:
        texts.append("\n[Similar persons] #1: ")
        texts += [f"\n#{i}: " for i in range(2, num_images)]
    tail = (
        f"\n[Conversation]\n{dialogue_text(initial, questions, answers)}\n\n"
        f"{INSTRUCTIONS[template_id]}{IM_END}\n{IM_START}assistant\n"
    )
    texts.append(tail)
    return PromptParts(tuple(texts), template_id, len(prefix))


def assistant_turn(question: str) -> str:
    """The training target after the assistant header: the question, then end of turn."""
    return f"{question.strip()}{IM_END}"


def clean_question(generated: str) -> str:
    """The question from a generation: first line, no role header or end-of-turn marker."""
    text = generated.split(IM_END)[0]
    text = text.removeprefix("assistant\n").strip()
    return text.splitlines()[0].strip() if text else ""
