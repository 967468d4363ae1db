"""Pictures of a few dialogues of one method, round by round.

For each chosen dialogue the picture has one row per round: on the left the retriever query of
that round (wrapped; when it is long, its newest part), the question asked after the ranking and
its answer; on the right the top-k gallery images of that round's ranking, best first, framed as
ReID ranked lists usually are: green for an image of the target identity, red for a wrong match;
a blue dot under the images that were shown to the questioner, and the target's rank.

Written as JPEG (mostly photographs: about a fifth of the size of a PNG).

Dialogues are chosen deterministically from ``cfg["seed"]``: mostly dialogues where the
target's rank improved from the first to the last round, plus at least one where it did not
(when there is one and more than one dialogue is drawn).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from llava_reid.artifacts import ArtifactError, atomic_path, read_table

log = logging.getLogger(__name__)

WIDTH = 1600
MARGIN = 16
TEXT_WIDTH = 600
GAP = 16
PAD = 6  # space either side of a thumbnail slot
BORDER = 4  # frame width around a thumbnail
MAX_THUMB_W, MAX_THUMB_H = 100, 200
MAX_QUERY_LINES = 6
MAX_QA_LINES = 3
JPEG_QUALITY = 80

WHITE = (255, 255, 255)
BLACK = (20, 20, 20)
GREY = (110, 110, 110)
LIGHT = (205, 205, 205)
BAND = (232, 236, 242)
GREEN = (0, 170, 0)
RED = (200, 30, 30)
BLUE = (30, 90, 200)
ORANGE = (190, 95, 0)

DIALOGUE_COLUMNS = ["query_id", "pid", "round", "query", "target_rank", "top_k", "candidates",
                    "question", "answer"]


@dataclass
class Thumb:
    """Where one gallery image was drawn (for tests and image maps)."""

    query_id: int
    round: int
    position: int  # 0-based rank position
    image_idx: int
    is_target: bool
    box: tuple[int, int, int, int]  # outer frame: x0, y0, x1, y1 (inclusive)


@dataclass
class _Block:
    """A laid-out piece of text: lines in one colour."""

    lines: list[str]
    color: tuple[int, int, int]
    font: Any


@dataclass
class _Row:
    query_id: int
    round: int
    blocks: list[_Block]
    top_k: list[int]
    candidates: set[int]
    target_pid: int
    height: int = 0


@dataclass
class _Dialogue:
    header: str
    header_color: tuple[int, int, int]
    rows: list[_Row] = field(default_factory=list)


def _font(size: int) -> Any:
    """Pillow's built-in font at ``size`` px (FreeType); the bitmap default without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _line_height(font: Any) -> int:
    top, bottom = font.getbbox("Ag|")[1::2]
    return int(bottom - min(top, 0)) + 4


def wrap(text: str, font: Any, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words are split."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}" if line else word
            if draw.textlength(trial, font=font) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = len(word)
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _limit(lines: list[str], n: int, keep: str) -> list[str]:
    """At most ``n`` lines, marking what was cut with an ellipsis."""
    if len(lines) <= n:
        return lines
    if keep == "tail":
        return ["\u2026 " + lines[len(lines) - n], *lines[len(lines) - n + 1 :]]
    return [*lines[: n - 1], lines[n - 1] + " \u2026"]


def choose_dialogues(ranks: dict[int, tuple[int, int]], n: int, seed: int) -> list[int]:
    """Pick ``n`` query ids from ``{query_id: (first-round rank, last-round rank)}``.

    Improved dialogues (last rank < first rank) are preferred; one dialogue that did not improve
    is included when there is one and ``n >= 2`` (or when nothing improved). Improved ones come
    first, each group in query-id order. Same inputs and seed, same choice.
    """
    n = min(int(n), len(ranks))
    improved = sorted(q for q, (first, last) in ranks.items() if last < first)
    other = sorted(q for q, (first, last) in ranks.items() if last >= first)
    k_other = 1 if other and (n >= 2 or not improved) else 0
    k_other = min(len(other), max(k_other, n - len(improved)))
    k_improved = n - k_other
    rng = np.random.default_rng(seed)
    pick_improved = sorted(improved[i] for i in rng.permutation(len(improved))[:k_improved])
    pick_other = sorted(other[i] for i in rng.permutation(len(other))[:k_other])
    return pick_improved + pick_other


class _Gallery:
    """Gallery identities and thumbnails, loaded on demand."""

    def __init__(self, gallery: str, image_root: str, size: tuple[int, int]):
        table = read_table(gallery, "gallery_features", columns=["image_idx", "pid", "file_path"])
        cols = table.to_pydict()
        self.pid = dict(zip(cols["image_idx"], cols["pid"], strict=True))
        self.path = dict(zip(cols["image_idx"], cols["file_path"], strict=True))
        self.root = Path(image_root)
        self.size = size
        self._cache: dict[int, Image.Image] = {}
        self.missing: list[int] = []

    def thumbnail(self, image_idx: int, font: Any) -> Image.Image:
        if image_idx in self._cache:
            return self._cache[image_idx]
        rel = self.path.get(image_idx)
        try:
            if rel is None:
                raise FileNotFoundError(f"image_idx {image_idx} is not in the gallery")
            with Image.open(self.root / rel) as img:
                thumb = ImageOps.contain(img.convert("RGB"), self.size, Image.Resampling.BICUBIC)
        except (OSError, FileNotFoundError) as exc:
            if not self.missing:
                log.warning("cannot open gallery image %s: %s", image_idx, exc)
            self.missing.append(image_idx)
            thumb = Image.new("RGB", self.size, LIGHT)
            ImageDraw.Draw(thumb).text((4, 4), "missing", fill=BLACK, font=font)
        self._cache[image_idx] = thumb
        return thumb


def _load_dialogues(path: str) -> dict[int, list[dict[str, Any]]]:
    rows = read_table(path, "dialogues", columns=DIALOGUE_COLUMNS).to_pylist()
    by_query: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_query.setdefault(int(row["query_id"]), []).append(row)
    for rounds in by_query.values():
        rounds.sort(key=lambda r: r["round"])
    return by_query


def _rank_text(rank: int, top_k: int) -> str:
    return f"target rank {rank}" + (f" (not in the top {top_k})" if rank > top_k else "")


def render(
    dialogues: dict[int, list[dict[str, Any]]],
    chosen: list[int],
    gallery: _Gallery,
    top_k: int,
    title: str,
) -> tuple[Image.Image, list[Thumb]]:
    """Draw the chosen dialogues; returns the picture and where each thumbnail went."""
    title_font, head_font, font, small = _font(24), _font(18), _font(15), _font(13)
    scratch = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    lh = {id(f): _line_height(f) for f in (title_font, head_font, font, small)}

    slot_w = (WIDTH - 2 * MARGIN - TEXT_WIDTH - GAP) // max(top_k, 1)
    thumb_w = max(16, min(MAX_THUMB_W, slot_w - 2 * PAD - 2 * BORDER))
    thumb_h = min(MAX_THUMB_H, int(thumb_w * 2.5))
    gallery.size = (thumb_w, thumb_h)
    frame_w, frame_h = thumb_w + 2 * BORDER, thumb_h + 2 * BORDER
    label_h = lh[id(small)] + 4
    text_w = TEXT_WIDTH - 8

    # Layout pass: wrap the text and size each row.
    laid: list[_Dialogue] = []
    for qid in chosen:
        rounds = dialogues[qid]
        first, last = rounds[0]["target_rank"], rounds[-1]["target_rank"]
        best = min(r["target_rank"] for r in rounds)
        verdict = "improved" if last < first else ("unchanged" if last == first else "worse")
        header = (
            f"Query {qid} (identity {rounds[0]['pid']}): target rank {first} -> {last} "
            f"after {rounds[-1]['round']} rounds, best {best} ({verdict})"
        )
        d = _Dialogue(header, GREEN if last < first else (BLACK if last == first else RED))
        prev = None
        for r in rounds:
            rank = int(r["target_rank"])
            if prev is None:
                color = BLACK
            else:
                color = GREEN if rank < prev else (RED if rank > prev else BLACK)
            change = "" if prev is None or rank == prev else f", was {prev}"
            status = f"Round {r['round']}: {_rank_text(rank, top_k)}{change}"
            blocks = [_Block([status], color, head_font)]
            query = wrap(f"Query: {r['query']}", font, text_w, scratch)
            blocks.append(_Block(_limit(query, MAX_QUERY_LINES, "tail"), BLACK, font))
            if r["question"]:
                q = wrap(f"Q: {r['question']}", font, text_w, scratch)
                blocks.append(_Block(_limit(q, MAX_QA_LINES, "head"), BLUE, font))
            if r["answer"]:
                a = wrap(f"A: {r['answer']}", font, text_w, scratch)
                blocks.append(_Block(_limit(a, MAX_QA_LINES, "head"), ORANGE, font))
            row = _Row(qid, int(r["round"]), blocks, [int(i) for i in r["top_k"][:top_k]],
                       {int(i) for i in (r["candidates"] or [])}, int(r["pid"]))
            text_h = sum(len(b.lines) * lh[id(b.font)] + 4 for b in blocks)
            row.height = max(text_h, frame_h + label_h) + 2 * PAD
            d.rows.append(row)
            prev = rank
        laid.append(d)

    legend = (
        "Each row: the retriever query of that round, the question asked next and its answer; "
        f"right: the top {top_k} gallery images, best first. Green frame = an image of the "
        "target identity, red frame = a wrong match; blue dot = shown to the questioner."
    )
    legend_lines = wrap(legend, font, WIDTH - 2 * MARGIN, scratch)
    header_h = lh[id(head_font)] + 2 * PAD
    height = MARGIN + lh[id(title_font)] + len(legend_lines) * lh[id(font)] + GAP
    height += sum(header_h + sum(r.height for r in d.rows) + GAP for d in laid) + MARGIN

    # Drawing pass.
    canvas = Image.new("RGB", (WIDTH, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    draw.text((MARGIN, y), title, fill=BLACK, font=title_font)
    y += lh[id(title_font)]
    for line in legend_lines:
        draw.text((MARGIN, y), line, fill=GREY, font=font)
        y += lh[id(font)]
    y += GAP
    thumbs: list[Thumb] = []
    x_thumbs = MARGIN + TEXT_WIDTH + GAP
    for d in laid:
        draw.rectangle((MARGIN, y, WIDTH - MARGIN - 1, y + header_h - 1), fill=BAND)
        draw.text((MARGIN + PAD, y + PAD), d.header, fill=d.header_color, font=head_font)
        y += header_h
        for row in d.rows:
            ty = y + PAD
            for block in row.blocks:
                for line in block.lines:
                    draw.text((MARGIN + 4, ty), line, fill=block.color, font=block.font)
                    ty += lh[id(block.font)]
                ty += 4
            for pos, image_idx in enumerate(row.top_k):
                x0 = x_thumbs + pos * slot_w + PAD
                y0 = y + PAD
                thumb = gallery.thumbnail(image_idx, small)
                canvas.paste(thumb, (x0 + BORDER + (thumb_w - thumb.width) // 2,
                                     y0 + BORDER + (thumb_h - thumb.height) // 2))
                is_target = gallery.pid.get(image_idx) == row.target_pid
                box = (x0, y0, x0 + frame_w - 1, y0 + frame_h - 1)
                draw.rectangle(box, outline=GREEN if is_target else RED, width=BORDER)
                label = f"#{pos + 1}"
                ly = y0 + frame_h + 2
                lw = draw.textlength(label, font=small)
                lx = x0 + (frame_w - lw) / 2
                draw.text((lx, ly), label, fill=GREEN if is_target else GREY, font=small)
                if image_idx in row.candidates:
                    r = 4
                    cx, cy = int(lx + lw + 4 + r), ly + lh[id(small)] // 2
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=BLUE)
                thumbs.append(Thumb(row.query_id, row.round, pos, image_idx, is_target, box))
            y += row.height
            draw.line((MARGIN, y - 1, WIDTH - MARGIN - 1, y - 1), fill=LIGHT)
        y += GAP
    return canvas, thumbs


def run(cfg: dict[str, Any], dialogues: str, gallery: str, image_root: str, out: str) -> None:
    """Draw ``cfg["report"]["queries"]`` dialogues of one method into the JPEG ``out``."""
    settings = cfg["report"]
    top_k = int(settings["top_k"])
    by_query = _load_dialogues(dialogues)
    if not by_query:
        raise ArtifactError(f"{dialogues}: no dialogues")
    stored = max(len(rows[0]["top_k"]) for rows in by_query.values())
    if top_k > stored:
        log.warning("report.top_k = %d, but the dialogues store only the top %d", top_k, stored)
    ranks = {q: (rows[0]["target_rank"], rows[-1]["target_rank"]) for q, rows in by_query.items()}
    chosen = choose_dialogues(ranks, int(settings["queries"]), int(cfg["seed"]))
    method = Path(dialogues).parent.name
    g = _Gallery(gallery, image_root, (MAX_THUMB_W, MAX_THUMB_H))
    picture, _ = render(by_query, chosen, g, top_k, f"Ranked lists: {method}")
    if g.missing:
        log.warning("%d gallery images could not be opened (drawn grey)", len(set(g.missing)))
    with atomic_path(out, suffix=".jpg") as tmp:
        picture.save(tmp, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    log.info("drew dialogues %s of %s (%dx%d px) to %s", chosen, method, *picture.size, out)
