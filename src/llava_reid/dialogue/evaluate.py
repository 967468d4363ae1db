"""evaluate: run the interactive dialogues of one chunk of the test queries for one method.

The test queries (one per test image: its initial description; the witness remembers its
fine-grained description) are split into ``n`` balanced chunks by query id (empty chunks are
fine); chunk ``i`` runs here, writing ``eval/{method}/chunks/{i}-of-{n}.parquet``.

After every completed round the rows so far are saved (atomically) next to the output as a
partial file; a rerun after an interruption resumes after the last completed round. The partial
file is tagged with the config hash (transport-only answerer settings left out) and with the
input files' fingerprint, so a changed config or a retrained upstream model starts over, with
a log line saying which; an unreadable partial file is discarded likewise. Answers are cached
in Parquet (keyed by target and question), so a rerun does not ask the answerer again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llava_reid.artifacts import ArtifactError, read_metadata, read_table, write_table
from llava_reid.data.annotations import read_annotations
from llava_reid.dialogue.askers import (
    Dialogue,
    InitialOnly,
    LookAheadOracle,
    QuestionerAsker,
    RandomAnnotated,
)
from llava_reid.dialogue.engine import DialogueEngine, advance
from llava_reid.dialogue.fusion import AuxiliarySimilaritySettings
from llava_reid.dialogue.fusion import from_settings as auxiliary_similarity
from llava_reid.retriever.encoder import RetrieverEncoder
from llava_reid.retriever.gallery import Gallery
from llava_reid.runtime import config_hash, seed_everything
from llava_reid.stage_views import METHODS, QUESTIONER_METHODS, config_key, typed_view
from llava_reid.training import inputs_fingerprint

log = logging.getLogger(__name__)


# Answerer settings that change how answers travel, not what they are: editing them keeps an
# interrupted chunk's rounds (and the answer cache, which is keyed by the answerer's model).
TRANSPORT_ONLY = {
    "openai": ("base_url", "api_key_env", "max_concurrency", "timeout_s", "max_retries"),
    "sglang": ("port", "gpu", "mem_fraction_static", "startup_timeout_s"),
}


@dataclass(frozen=True)
class EvaluateConfig:
    """Every setting evaluate reads for any method, built once from its validated view."""

    seed: int
    device: str
    rounds: int = config_key("dialogue.rounds")
    pool_size: int = config_key("dialogue.pool_size")
    text_batch_size: int = config_key("features.batch_size")
    auxiliary_similarity: AuxiliarySimilaritySettings | None = config_key(
        "evaluate.auxiliary_similarity")
    # The answerer section as passed: what build_answerer reads.
    answerer: Mapping[str, Any]


@dataclass(frozen=True)
class GenerationSettings:
    """The ``evaluate.generation`` section: how the questioner samples its questions."""

    max_new_tokens: int
    do_sample: bool
    top_p: float
    temperature: float
    batch_size: int  # dialogues generated together
    votes: int  # samples per question; the one most of them agree on is asked


@dataclass(frozen=True)
class QuestionerEvaluation:
    """What the questioner's methods (questioner, selector) read on top of EvaluateConfig."""

    num_candidates: int = config_key("dialogue.num_candidates")
    generation: GenerationSettings = config_key("evaluate.generation")
    # The questioner section as passed: what loading the questioner reads.
    questioner: Mapping[str, Any]


def read_settings(cfg: dict[str, Any], method: str
                  ) -> tuple[EvaluateConfig, QuestionerEvaluation | None]:
    """The typed views ``method`` reads (the questioner's part only for its methods)."""
    asking = typed_view(QuestionerEvaluation, cfg) if method in QUESTIONER_METHODS else None
    return typed_view(EvaluateConfig, cfg), asking


def results_settings(settings: EvaluateConfig, asking: QuestionerEvaluation | None,
                     method: str) -> dict[str, Any]:
    """What a chunk's rounds depend on in the config (the partial file's and output's tag):
    the sections the stage was passed, less ``device``, ``features`` and the answerer's
    transport-only settings."""
    answerer = dict(settings.answerer)
    for section, keys in TRANSPORT_ONLY.items():
        if isinstance(answerer.get(section), dict):
            answerer[section] = {k: v for k, v in answerer[section].items() if k not in keys}
    dialogue: dict[str, Any] = {"rounds": settings.rounds, "pool_size": settings.pool_size}
    tag = {"seed": settings.seed, "dialogue": dialogue, "answerer": answerer}
    evaluate = {}
    if settings.auxiliary_similarity is not None:
        evaluate["auxiliary_similarity"] = dataclasses.asdict(settings.auxiliary_similarity)
    if asking is not None:
        dialogue["num_candidates"] = asking.num_candidates
        tag["questioner"] = asking.questioner
        evaluate["generation"] = dataclasses.asdict(asking.generation)
    if evaluate:
        tag["evaluate"] = evaluate
    return tag | {"method": method}


def chunk_ids(query_ids: list[int], index: int, count: int) -> list[int]:
    """Chunk ``index`` of ``count`` balanced, contiguous chunks of the sorted ids."""
    if not 0 <= index < count:
        raise ValueError(f"chunk {index} of {count} does not exist")
    ordered = sorted(query_ids)
    bounds = np.linspace(0, len(ordered), count + 1).round().astype(int)
    return ordered[bounds[index] : bounds[index + 1]]


def load_dialogues(annotations: str, queries: str, ids: list[int]) -> list[Dialogue]:
    q = read_table(queries, "query_features").to_pandas().set_index("query_id")
    rows = read_annotations(annotations).set_index("image_idx")
    out = []
    for qid in ids:
        target = int(q.loc[qid, "image_idx"])
        rec = rows.loc[target]
        out.append(Dialogue(
            query_id=int(qid), pid=int(q.loc[qid, "pid"]),
            initial=str(q.loc[qid, "initial_description"]),
            memory=str(rec.fine_grained_description),
            annotated_questions=tuple(rec.questions), annotated_answers=tuple(rec.answers),
            image_idx=target,
        ))
    return out


def question_bank(annotations: str, image_idx) -> list[tuple[str, str]]:
    """Every annotated (question, answer) pair of the gallery's images (the whole test split,
    whatever the chunk, so every chunk's answerer is the same)."""
    rows = read_annotations(annotations).set_index("image_idx")
    ids = [int(i) for i in image_idx.tolist()]
    return [(str(q), str(a)) for i in ids if i in rows.index
            for q, a in zip(rows.loc[i].questions, rows.loc[i].answers, strict=True)]


def restore(dialogues: list[Dialogue], rows: pd.DataFrame) -> int:
    """Replay saved rounds onto fresh dialogues; returns the next round to run."""
    if rows.empty:
        return 0
    by_id = {d.query_id: d for d in dialogues}
    for row in rows.sort_values(["query_id", "round"]).itertuples():
        d = by_id[int(row.query_id)]
        index = (d.annotated_questions.index(row.question)
                 if row.question in d.annotated_questions else -1)
        advance(d, row.question, row.answer, index)
    return int(rows["round"].max()) + 1


def build_asker(method: str, settings: EvaluateConfig, asking: QuestionerEvaluation | None,
                encoder, gallery: Gallery, models: dict[str, str | None]):
    seed = settings.seed
    if method == "initial":
        return InitialOnly()
    if method == "random":
        return RandomAnnotated(seed)
    if method == "oracle":
        return LookAheadOracle(encoder, gallery, settings.text_batch_size)
    if method not in QUESTIONER_METHODS or asking is None:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    from llava_reid.questioner.generate import GenerationConfig
    from llava_reid.questioner.model import Questioner
    from llava_reid.questioner.visual_cache import VisualTokenCache

    questioner = Questioner.from_pretrained(models["questioner"], asking.questioner,
                                            settings.device)
    questioner.load_adapter(models["adapter"], merge=True)
    questioner.net.eval()
    questioner.fuse_language_model()
    cache = VisualTokenCache(models["visual_tokens"], questioner.device,
                             next(questioner.net.parameters()).dtype)
    cache.check_model(questioner)
    selector = None
    if method == "selector":
        from llava_reid.selector import Selector

        selector = Selector.load(models["selector"], encoder.device)
    sampling = asking.generation
    generation = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
        top_p=sampling.top_p, temperature=sampling.temperature)
    return QuestionerAsker(questioner, cache, gallery, generation, seed, settings.pool_size,
                           asking.num_candidates, sampling.batch_size, selector=selector,
                           votes=sampling.votes)


def rows_table(rows: list[dict[str, Any]], dim: int) -> pa.Table:
    frame = {name: [r[name] for r in rows] for name in (
        "query_id", "pid", "round", "query", "target_rank", "top_k", "candidates",
        "seen_images", "question", "answer")}
    feats = np.stack([r["query_feat"] for r in rows]).astype(np.float32) if rows else \
        np.zeros((0, dim), np.float32)
    frame["query_feat"] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim)
    frame["top_k"] = [list(map(int, x)) for x in frame["top_k"]]
    return pa.table(frame)


def load_partial(partial: Path, tag: str, inputs: str, dialogues: list[Dialogue]
                 ) -> pd.DataFrame:
    """The rounds an interrupted run saved, replayed onto ``dialogues``; empty (and the file
    removed, with a log line saying why) when it is from another config or other input files
    or cannot be read."""
    if not partial.exists():
        return pd.DataFrame()
    try:
        meta = read_metadata(partial)
        reason = None
        if meta.get("config_hash") != tag:
            reason = "the config changed since it was written"
        elif meta.get("inputs_fingerprint") != inputs:
            reason = ("an input file (retriever, gallery, queries, questioner, adapter, "
                      "visual tokens, selector or annotations) was rewritten since it was written")
        if reason is None:
            done = read_table(partial, "dialogues").to_pandas()
            unknown = set(done["query_id"]) - {d.query_id for d in dialogues}
            if unknown:
                raise ArtifactError(f"{len(unknown)} query ids that are not in this chunk")
            return done
    except Exception as exc:  # noqa: BLE001 - any unreadable file is discarded, never fatal
        reason = f"it is unreadable ({type(exc).__name__}: {exc})"
    log.warning("discarding partial results %s: %s; this chunk starts from round 0", partial,
                reason)
    partial.unlink(missing_ok=True)
    return pd.DataFrame()


def run(cfg: dict[str, Any], method: str, chunk: int, chunks: int, annotations: str,
        gallery: str, queries: str, retriever: str, out: str, answers_cache: str,
        questioner: str | None = None, adapter: str | None = None,
        visual_tokens: str | None = None, selector: str | None = None,
        image_root: str | None = None) -> None:
    started = time.time()
    settings, asking = read_settings(cfg, method)
    seed_everything(settings.seed)
    tag = config_hash(results_settings(settings, asking, method))
    inputs = inputs_fingerprint(annotations, gallery, queries, retriever, questioner, adapter,
                                visual_tokens, selector)
    encoder = RetrieverEncoder.from_pretrained(retriever, settings.device)
    test_gallery = Gallery.from_parquet(gallery, encoder.device)
    all_ids = read_table(queries, "query_features", columns=["query_id"]).column(
        "query_id").to_pylist()
    ids = chunk_ids(all_ids, chunk, chunks)
    # Checked before any server starts.
    auxiliary = auxiliary_similarity(settings.auxiliary_similarity, all_ids, test_gallery)
    dialogues = load_dialogues(annotations, queries, ids)
    meta = {"method": method, "chunk": f"{chunk}-of-{chunks}", "queries": len(ids)}

    partial = Path(out).with_name(f".{Path(out).stem}.partial.parquet")
    done = load_partial(partial, tag, inputs, dialogues)
    try:
        start = restore(dialogues, done)
    except Exception as exc:  # noqa: BLE001 - rounds that do not replay are discarded
        log.warning("discarding partial results %s: its rounds do not replay (%s: %s); this "
                    "chunk starts from round 0", partial, type(exc).__name__, exc)
        partial.unlink(missing_ok=True)
        done, start = pd.DataFrame(), 0
        dialogues = load_dialogues(annotations, queries, ids)
    if start:
        log.info("resuming %s chunk %d/%d after round %d", method, chunk, chunks, start - 1)

    from llava_reid.answerer import build_answerer
    from llava_reid.answerer.visual import TargetImages

    asker = build_asker(method, settings, asking, encoder, test_gallery, {
        "questioner": questioner, "adapter": adapter, "visual_tokens": visual_tokens,
        "selector": selector})
    # Askers that answer from the annotations themselves (initial, oracle) never build the
    # witness, so no SGLang server is started for their chunks.
    answerer = None
    if asker.asks_witness:
        # A witness that looks at the target image (transfer) gets the image files.
        images = TargetImages(annotations, image_root) if image_root else None
        answerer = build_answerer(settings.answerer, answers_cache, seed=settings.seed,
                                  images=images, question_bank=question_bank(
                                      annotations, test_gallery.image_idx))
    engine = DialogueEngine(encoder, test_gallery, asker, answerer, settings.rounds,
                            settings.pool_size, settings.text_batch_size, auxiliary=auxiliary)
    rows = done.to_dict("records")

    def checkpoint(round_: int, new_rows: list[dict[str, Any]]) -> None:
        rows.extend(new_rows)
        if hasattr(answerer, "flush"):
            answerer.flush()
        if round_ < settings.rounds:
            write_table(rows_table(rows, encoder.dim), partial, "dialogues", config_hash=tag,
                        producer="evaluate",
                        extra_metadata={**meta, "inputs_fingerprint": inputs})

    try:
        engine.run(dialogues, start, checkpoint)
    finally:
        if answerer is not None:
            answerer.close()
    meta["seconds"] = round(time.time() - started, 1)
    write_table(rows_table(rows, encoder.dim), out, "dialogues", config_hash=tag,
                producer="evaluate", extra_metadata={**meta, "label": asker.label})
    partial.unlink(missing_ok=True)
    log.info("%s chunk %d/%d: %d dialogues in %.1fs", method, chunk, chunks, len(ids),
             time.time() - started)
