"""One person's search: the dialogue engine's round, with the person as the answerer.

A round is the engine's step: rank the query so far against the gallery, give the asker the
round's pool (the selector picks the candidates the questioner sees), and ask. The person's
answer then advances the dialogue exactly as a simulated answer would (``engine.advance``:
cleaned, "I don't know" adds nothing), and the next round re-ranks. Questions go on past the
configured rounds while the person wants; "that's them" (a picked image) ends the session.

Every round's row is saved (atomically, after each round) in the evaluation's dialogue schema
plus ``answered_by``, ``session_id`` and ``picked``; a session without a known target
(free mode) takes the picked image's identity as its target once the person picks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from llava_reid.artifacts import write_table
from llava_reid.dialogue.askers import Dialogue, RoundContext
from llava_reid.dialogue.engine import TOP_K_RECORDED, UNKNOWN_TARGET, advance
from llava_reid.dialogue.evaluate import rows_table
from llava_reid.dialogue.query import append_answer
from llava_reid.runtime import config_hash
from llava_reid.witness.models import WitnessModels

PERSON = "person"
UNKNOWN_ID = UNKNOWN_TARGET  # query_id / pid of a free session (no known target)
IDK = "I don't know"


@dataclass
class Ranked:
    rank: int
    image_idx: int
    pid: int
    score: float
    file_path: str
    candidate: bool  # shown to the questioner this round


@dataclass
class RoundState:
    round: int
    query: str
    ranking: list[Ranked]
    target_rank: int | None
    question: str
    candidates: list[int]


@dataclass
class WitnessSession:
    models: WitnessModels
    dialogue: Dialogue
    replay: bool
    out: Path | None
    top_k: int = TOP_K_RECORDED
    session_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-")
                            + uuid.uuid4().hex[:6])
    rows: list[dict[str, Any]] = field(default_factory=list)
    current: RoundState | None = None
    picked: int = -1
    finished: bool = False

    @classmethod
    def start(cls, models: WitnessModels, description: str | None = None,
              query_id: int | None = None, out_dir: str | Path | None = None,
              top_k: int = TOP_K_RECORDED) -> WitnessSession:
        """Free mode from a ``description``, or replay mode on test query ``query_id``."""
        if query_id is not None:
            dialogue, replay = models.test_dialogue(int(query_id)), True
        else:
            text = " ".join((description or "").split())
            if not text:
                raise ValueError("a first description of the person is needed")
            dialogue = Dialogue(query_id=UNKNOWN_ID, pid=UNKNOWN_ID, initial=text, memory="",
                                annotated_questions=(), annotated_answers=())
            replay = False
        session = cls(models, dialogue, replay, None, max(1, top_k))
        if out_dir is not None:
            session.out = Path(out_dir) / f"{session.session_id}.parquet"
        session.step()
        return session

    @property
    def round(self) -> int:
        return sum(r["answered_by"] == PERSON for r in self.rows)

    def step(self) -> RoundState:
        """Rank the query so far, then the asker's question for this round."""
        m, d, r = self.models, self.dialogue, self.round
        engine = m.engine
        with m.lock, torch.no_grad():
            feats, ranks, pools = engine.rank([d])
            head = pools[0, : max(self.top_k, TOP_K_RECORDED)]
            scores = m.gallery.similarity(feats[:1])[0, head].float().cpu().tolist()
            ctx = RoundContext(r, [d], feats, pools[:, : engine.pool_size], ranks)
            asked = engine.asker.ask(ctx)[0]
        g = m.gallery
        rows = head.cpu().tolist()
        image_idx = g.image_idx[head].cpu().tolist()
        pids = g.pids[head].cpu().tolist()
        shown = set(asked.candidates)
        ranking = [Ranked(i + 1, image_idx[i], int(pids[i]), round(scores[i], 4),
                          g.file_paths[rows[i]], image_idx[i] in shown)
                   for i in range(len(rows))][: self.top_k]
        known = d.pid != UNKNOWN_ID
        self.rows.append({
            "query_id": d.query_id, "pid": d.pid, "round": r, "query": d.query,
            "target_rank": int(ranks[0]) if known else UNKNOWN_ID,
            "top_k": np.asarray(image_idx[:TOP_K_RECORDED], np.int32),
            "candidates": list(asked.candidates), "seen_images": list(asked.seen),
            "question": asked.question, "answer": "", "answered_by": "",
            "query_feat": feats[0].float().cpu().numpy()})
        self.current = RoundState(r, d.query, ranking, int(ranks[0]) if known else None,
                                  asked.question, list(asked.candidates))
        self.save()
        return self.current

    def answer(self, text: str) -> RoundState:
        """The person's answer to this round's question; the next round follows."""
        self._check_open()
        text = " ".join(text.split()) or IDK
        row = self.rows[-1]
        row.update(answer=text, answered_by=PERSON)
        if row["question"]:
            advance(self.dialogue, row["question"], text)
        else:  # the questioner produced nothing: the answer still joins the query
            self.dialogue.query = append_answer(self.dialogue.query, text)
        return self.step()

    def finish(self, picked: int | None = None) -> None:
        """End the session ("that's them" with ``picked``, or stop without a pick)."""
        self._check_open()
        position = self.models.gallery.position_of()
        if picked is not None and int(picked) not in position:
            raise KeyError(f"image {picked} is not in the gallery {self.models.files.gallery}")
        last = self.rows[-1]  # its question was never answered: the row is a final ranking
        last.update(question="", answer="", candidates=[], seen_images=[])
        if picked is not None:
            self.picked = int(picked)
            if not self.replay:  # the person's pick names the target of a free session
                self._set_target(int(self.models.gallery.pids[position[self.picked]]))
        self.finished = True
        if self.current is not None:
            self.current.question, self.current.candidates = "", []
        self.save()

    @property
    def picked_correct(self) -> bool | None:
        if self.picked < 0 or not self.replay:
            return None
        g = self.models.gallery
        return int(g.pids[g.position_of()[self.picked]]) == self.dialogue.pid

    def _set_target(self, pid: int) -> None:
        feats = torch.from_numpy(np.stack([r["query_feat"] for r in self.rows]))
        with self.models.lock:
            ranks = self.models.gallery.target_ranks(feats, torch.full((len(feats),), pid))
        for row, rank in zip(self.rows, ranks.tolist(), strict=True):
            row.update(pid=pid, target_rank=int(rank))
        self.dialogue.pid = pid
        if self.current is not None:
            self.current.target_rank = int(ranks[-1])

    def _check_open(self) -> None:
        if self.finished:
            raise ValueError(f"session {self.session_id} is finished")

    def table(self) -> pa.Table:
        dim = self.models.engine.encoder.dim
        table = rows_table(self.rows, dim)
        n = len(self.rows)
        return (table.append_column("answered_by", pa.array([r["answered_by"] for r in self.rows],
                                                            pa.string()))
                .append_column("session_id", pa.array([self.session_id] * n, pa.string()))
                .append_column("picked", pa.array([self.picked] * n, pa.int32())))

    def save(self) -> None:
        if self.out is None:
            return
        m = self.models
        write_table(self.table(), self.out, "witness_dialogues",
                    config_hash=config_hash({"run": str(m.files.run), "method": m.files.method}),
                    producer="witness",
                    extra_metadata={"method": m.files.method, "label": m.label,
                                    "mode": "replay" if self.replay else "free",
                                    "rounds": m.rounds})

    def view(self) -> dict[str, Any]:
        """The session as the page shows it (JSON)."""
        cur = self.current
        history = [{"round": r["round"], "question": r["question"], "answer": r["answer"],
                    "target_rank": r["target_rank"] if r["target_rank"] >= 0 else None}
                   for r in self.rows]
        out = {
            "session_id": self.session_id, "mode": "replay" if self.replay else "free",
            "round": cur.round, "rounds": self.models.rounds, "query": cur.query,
            "initial": self.dialogue.initial, "question": cur.question,
            "candidates": cur.candidates, "target_rank": cur.target_rank,
            "ranking": [vars(x) for x in cur.ranking], "history": history,
            "finished": self.finished, "picked": self.picked if self.picked >= 0 else None,
            "picked_correct": self.picked_correct,
            "saved_to": str(self.out) if self.out else None,
        }
        if self.replay:
            out["query_id"] = self.dialogue.query_id
            out["target_pid"] = self.dialogue.pid
            out["simulated"] = self.models.simulated_rounds(self.dialogue.query_id)
        return out
