"""The answerer interface: what the dialogue engine hands the witness and gets back.

The engine batches one round of many dialogues into a list of ``AnswerRequest`` and expects the
answers back in the same order. Every implementation (annotation-grounded, OpenAI-compatible
server, self-started SGLang) and the cache wrapper speak this one protocol, so the engine never
needs to know which witness it talks to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

IDK = "I don't know."
"""The answer a witness gives when it cannot (or should not) answer."""


@dataclass(frozen=True)
class AnswerRequest:
    """One question to the witness about one target person."""

    request_id: str  # unique within one call, e.g. "1234:2" (query id : round)
    target_id: int  # image_idx of the target image
    question: str
    memory: str  # the fine-grained description, first person ("I saw a man ...")
    annotated_questions: tuple[str, ...]  # the target image's annotated Q/A pairs
    annotated_answers: tuple[str, ...]


@runtime_checkable
class Answerer(Protocol):
    """Answers a batch of questions; ``answer`` returns one string per request, in order."""

    name: str  # identifies the answerer and its model, e.g. "annotated", "openai:<model>"

    def answer(self, requests: Sequence[AnswerRequest]) -> list[str]: ...

    def close(self) -> None: ...


class AnswererError(RuntimeError):
    """The answerer cannot produce answers (server unreachable, key rejected, bad reply...)."""


class AnswerBatchError(AnswererError):
    """A batch failed part-way. ``answers`` holds what was received before the failure
    (request_id -> answer), so a caller such as the cache can keep it instead of asking again."""

    def __init__(self, message: str, answers: dict[str, str] | None = None):
        super().__init__(message)
        self.answers = dict(answers or {})


def too_short(question: str, min_chars: int) -> bool:
    """Questions shorter than ``min_chars`` (after trimming) get ``IDK`` without being asked.

    A degenerate questioner output ("?", "What", "") carries no information; asking a model about
    it only costs a request and invites a made-up answer.
    """
    return len(question.strip()) < int(min_chars)


def check_unique_ids(requests: Sequence[AnswerRequest]) -> None:
    """Answers are matched to requests by id, so ids must be unique within a call."""
    seen: set[str] = set()
    for r in requests:
        if r.request_id in seen:
            raise ValueError(f"duplicate request_id {r.request_id!r} in one answer() call")
        seen.add(r.request_id)


def request_settings(ocfg: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI-compatible client's request settings from the validated ``answerer.openai``
    section (the openai and sglang kinds send the same)."""
    return {key: ocfg[key] for key in ("max_concurrency", "timeout_s", "max_retries",
                                       "temperature", "top_p", "max_tokens")}
