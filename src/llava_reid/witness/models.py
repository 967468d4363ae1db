"""The trained system, loaded once per process, the way evaluation loads it.

Retriever, gallery features, asker (questioner + adapter + cached visual tokens + selector) and
the test queries all come through ``llava_reid.dialogue.evaluate``'s loaders; the person takes
the answerer's place, so none is built. Model calls are serialised by ``lock`` (one server may
hold several sessions; the models are not re-entrant).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from llava_reid.artifacts import ArtifactError, read_table
from llava_reid.dialogue.askers import Dialogue
from llava_reid.dialogue.engine import DialogueEngine
from llava_reid.dialogue.evaluate import build_asker, load_dialogues, read_settings
from llava_reid.retriever.encoder import RetrieverEncoder
from llava_reid.retriever.gallery import Gallery
from llava_reid.runtime import seed_everything
from llava_reid.witness.run_files import RunFiles

log = logging.getLogger(__name__)


@dataclass
class WitnessModels:
    cfg: dict[str, Any]
    files: RunFiles
    engine: DialogueEngine
    test_queries: pd.DataFrame  # query_id, pid, initial_description
    simulated: pd.DataFrame | None  # the simulated answerer's dialogues (replay comparison)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, cfg: dict[str, Any], files: RunFiles) -> WitnessModels:
        files.check()
        seed_everything(cfg["seed"])
        encoder = RetrieverEncoder.from_pretrained(str(files.retriever), cfg["device"])
        gallery = Gallery.from_parquet(str(files.gallery), encoder.device)
        settings, asking = read_settings(cfg, files.method)
        asker = build_asker(files.method, settings, asking, encoder, gallery, files.models())
        engine = DialogueEngine(encoder, gallery, asker, answerer=None, rounds=settings.rounds,
                                pool_size=settings.pool_size,
                                text_batch_size=settings.text_batch_size)
        queries = read_table(str(files.queries), "query_features",
                             columns=["query_id", "pid", "initial_description"]).to_pandas()
        simulated = None
        if files.simulated.exists():
            try:
                simulated = read_table(str(files.simulated), "dialogues", columns=[
                    "query_id", "round", "question", "answer", "target_rank"]).to_pandas()
            except ArtifactError as exc:
                log.warning("replay comparison off: %s", exc)
        log.info("witness demo: %s on %s (%d gallery images, %d test queries)", asker.label,
                 encoder.device, len(gallery), len(queries))
        return cls(cfg, files, engine, queries.sort_values("query_id").reset_index(drop=True),
                   simulated)

    @property
    def gallery(self) -> Gallery:
        return self.engine.gallery

    @property
    def rounds(self) -> int:
        return self.engine.rounds

    @property
    def label(self) -> str:
        return self.engine.asker.label

    def test_dialogue(self, query_id: int) -> Dialogue:
        """Replay mode: the test query's dialogue, as evaluation starts it."""
        if query_id not in set(self.test_queries["query_id"].tolist()):
            raise KeyError(f"{self.files.queries}: no test query with query_id {query_id}")
        return load_dialogues(str(self.files.annotations), str(self.files.queries),
                              [query_id])[0]

    def simulated_rounds(self, query_id: int) -> list[dict[str, Any]]:
        if self.simulated is None:
            return []
        rows = self.simulated[self.simulated["query_id"] == query_id].sort_values("round")
        return [{"round": int(r.round), "question": str(r.question), "answer": str(r.answer),
                 "target_rank": int(r.target_rank)} for r in rows.itertuples()]
