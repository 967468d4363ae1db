"""A persistent answer cache in front of any answerer.

LLM answers are the slow, costly part of an evaluation round, and a rerun (a crashed job, a
changed metric, another chunking) asks the same (target, question) pairs again. The cache keeps
them in a Parquet artifact (``answers_cache``: target_id, question, answer, answerer) and asks the
wrapped answerer only for what it has not seen, each distinct pair once. Answers are reused only
from an answerer with the same ``name`` (which includes the model), so switching models never
serves stale answers; rows of other answerers are kept in the file untouched.

Each answer is appended to a journal next to the cache (``.<name>.journal.jsonl``) the moment
it arrives, and folded into the Parquet file at every flush: a server that dies mid-batch, or a
``kill -9`` of this process while a round's answers are in flight, loses nothing that arrived,
and the rerun asks none of it again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from llava_reid.answerer.base import AnswerBatchError, Answerer, AnswerRequest, check_unique_ids
from llava_reid.artifacts import read_table, write_table

log = logging.getLogger(__name__)

KIND = "answers_cache"
Key = tuple[int, str]


class CachedAnswerer:
    """Wraps ``inner``; answers keyed by (target_id, question) and persisted at ``path``."""

    def __init__(self, inner: Answerer, path: str | Path, *, autoflush: bool = True,
                 config_hash: str = ""):
        self.inner = inner
        self.name = inner.name
        self.path = Path(path)
        self.autoflush = autoflush
        self.config_hash = config_hash
        self._answers: dict[Key, str] = {}
        self._others: dict[tuple[int, str, str], str] = {}  # other answerers' rows, kept as is
        self._dirty = False
        self.hits = 0
        self.misses = 0
        self.journal = self.path.with_name(f".{self.path.name}.journal.jsonl")
        self._journal_file = None
        self._journal_lock = threading.Lock()
        self._in_flight: dict[str, Key] = {}  # request_id -> key of the batch being asked
        if self.path.exists():
            self._load()
        if self.journal.exists():
            self._load_journal()
        self._hook_arrivals()

    def _hook_arrivals(self) -> None:
        """Journal each answer as the inner answerer receives it (when it reports arrivals)."""
        client = getattr(self.inner, "client", self.inner)
        if not hasattr(client, "on_answer"):
            return
        previous = client.on_answer

        def on_answer(request_id: str, answer: str) -> None:
            key = self._in_flight.get(request_id)
            if key is not None:
                self._journal_write([(key, answer)])
            if previous is not None:
                previous(request_id, answer)

        client.on_answer = on_answer

    def _journal_write(self, items: list[tuple[Key, str]]) -> None:
        with self._journal_lock:
            if self._journal_file is None:
                self._journal_file = self.journal.open("a", encoding="utf-8")
            for (target, question), answer in items:
                self._journal_file.write(json.dumps(
                    {"target_id": target, "question": question, "answer": answer,
                     "answerer": self.name}) + "\n")
            # In the kernel's hands: a killed process loses nothing written here.
            self._journal_file.flush()

    def _load_journal(self) -> None:
        """Answers that arrived after the last flush of an interrupted run."""
        count = 0
        for number, line in enumerate(self.journal.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                key = (int(row["target_id"]), str(row["question"]))
                answer, answerer = str(row["answer"]), str(row["answerer"])
            except (ValueError, KeyError, TypeError):
                # The line being written when the process died: that answer is asked again.
                log.warning("answer journal %s line %d is incomplete: skipped", self.journal,
                            number)
                continue
            if answerer == self.name:
                self._answers[key] = answer
            else:
                self._others[(*key, answerer)] = answer
            count += 1
        if count:
            self._dirty = True
            log.info("answer journal %s: %d answers of an interrupted run recovered",
                     self.journal, count)

    def _load(self) -> None:
        rows = read_table(self.path, KIND).to_pylist()
        for row in rows:
            if row["answerer"] == self.name:
                self._answers[(int(row["target_id"]), row["question"])] = row["answer"]
            else:
                self._others[(int(row["target_id"]), row["question"], row["answerer"])] = (
                    row["answer"])
        log.info("answer cache %s: %d answers of %s (%d rows of other answerers)", self.path,
                 len(self._answers), self.name, len(self._others))

    def __len__(self) -> int:
        return len(self._answers)

    def answer(self, requests: Sequence[AnswerRequest]) -> list[str]:
        check_unique_ids(requests)
        keys = [(int(r.target_id), r.question) for r in requests]
        # One request per distinct missing key (the first one asking it).
        missing: dict[Key, AnswerRequest] = {}
        for key, req in zip(keys, requests, strict=True):
            if key not in self._answers and key not in missing:
                missing[key] = req
        self.misses += len(missing)
        self.hits += len(requests) - len(missing)
        if missing:
            asked = list(missing.values())
            self._in_flight = {r.request_id: key for key, r in missing.items()}
            try:
                got = self.inner.answer(asked)
            except AnswerBatchError as exc:
                self._store({(int(r.target_id), r.question): exc.answers[r.request_id]
                             for r in asked if r.request_id in exc.answers})
                if exc.answers:
                    self.flush()  # keep what was received even if the caller dies now
                raise
            finally:
                self._in_flight = {}
            if len(got) != len(asked):
                raise RuntimeError(f"answerer {self.name} returned {len(got)} answers for "
                                   f"{len(asked)} questions")
            self._store(dict(zip(missing.keys(), got, strict=True)))
            if self.autoflush:
                self.flush()
            else:  # also those the inner answerer does not report on arrival
                self._journal_write(list(zip(missing.keys(), got, strict=True)))
        return [self._answers[k] for k in keys]

    def _store(self, new: dict[Key, str]) -> None:
        if new:
            self._answers.update(new)
            self._dirty = True

    def flush(self) -> None:
        """Write the cache atomically (temporary file, then rename). Rows another process
        added to the file in the meantime are merged in, ours win on conflicts."""
        if not self._dirty:
            return
        if self.path.exists():
            for row in read_table(self.path, KIND).to_pylist():
                key = (int(row["target_id"]), row["question"])
                if row["answerer"] == self.name:
                    self._answers.setdefault(key, row["answer"])
                else:
                    self._others.setdefault((*key, row["answerer"]), row["answer"])
        rows = [(t, q, a, self.name) for (t, q), a in self._answers.items()]
        rows += [(t, q, a, n) for (t, q, n), a in self._others.items()]
        rows.sort(key=lambda r: (r[3], r[0], r[1]))  # stable file content for the same cache
        table = pa.table({
            "target_id": pa.array([r[0] for r in rows], pa.int32()),
            "question": pa.array([r[1] for r in rows], pa.string()),
            "answer": pa.array([r[2] for r in rows], pa.string()),
            "answerer": pa.array([r[3] for r in rows], pa.string()),
        })
        write_table(table, self.path, KIND, config_hash=self.config_hash, producer=self.name)
        self._dirty = False
        with self._journal_lock:  # everything journaled is in the Parquet file now
            if self._journal_file is not None:
                self._journal_file.close()
                self._journal_file = None
            self.journal.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.inner.close()
