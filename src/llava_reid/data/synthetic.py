"""Synthetic pedestrians in the Interactive-PEDES annotation format (the embedded default).

Each identity is a unique set of attributes (llava_reid.data.attributes); each of its images is
the same person seen by a different "camera": background, light, scale, position, limb pose,
mirror and sensor noise change, the clothes do not. Records carry a short initial description
(the gender and a few garment facts, ``data.synthetic.initial_facts``), a full fine-grained
description and question/answer pairs about what the initial description left out.

Beside the images the stage also writes ``drawn.json`` (what it drew in each image, for the
rendered answerer) and ``data_captions.json`` (the test split in RSTPReid's layout, for the
embedded transfer check).

Everything derives from the config's seed (numpy generators keyed by seed, split, identity
and camera), so the same config gives byte-identical annotations and images.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from llava_reid.artifacts import atomic_dir, atomic_path
from llava_reid.data import SPLITS
from llava_reid.data import attributes as A
from llava_reid.data.attributes import Person

log = logging.getLogger(__name__)

SUPERSAMPLE = 2  # draw at 2x and downsample: smoother edges at small sizes


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


@dataclass(frozen=True)
class Camera:
    background: tuple[int, int, int]
    floor: tuple[int, int, int]
    light: float  # brightness factor
    contrast: float
    scale: float  # figure height / image height
    shift: float  # horizontal offset, fraction of width
    arm_swing: float  # pixels (at 1x) of hand displacement
    leg_spread: float
    flip: bool
    noise: float  # std of additive sensor noise
    clutter: int  # number of background shapes


def sample_camera(rng: np.random.Generator) -> Camera:
    def muted() -> tuple[int, int, int]:
        base = rng.integers(60, 200, size=3)
        grey = base.mean()
        return tuple(int(0.45 * c + 0.55 * grey) for c in base)

    return Camera(
        background=muted(),
        floor=muted(),
        light=float(rng.uniform(0.78, 1.18)),
        contrast=float(rng.uniform(0.85, 1.1)),
        scale=float(rng.uniform(0.78, 0.9)),
        shift=float(rng.uniform(-0.08, 0.08)),
        arm_swing=float(rng.uniform(-3, 3)),
        leg_spread=float(rng.uniform(0, 3)),
        flip=bool(rng.random() < 0.5),
        noise=float(rng.uniform(2, 7)),
        clutter=int(rng.integers(0, 4)),
    )


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * f))) for c in rgb)


def render(person: Person, camera: Camera, height: int, width: int, rng) -> Image.Image:
    """Draw ``person`` as seen by ``camera`` into an RGB image of (height, width)."""
    s = SUPERSAMPLE
    H, W = height * s, width * s
    img = Image.new("RGB", (W, H), camera.background)
    d = ImageDraw.Draw(img)
    floor_y = int(H * 0.86)
    d.rectangle([0, floor_y, W, H], fill=camera.floor)
    for _ in range(camera.clutter):  # walls, poles, windows
        x0 = int(rng.integers(0, W))
        y0 = int(rng.integers(0, floor_y))
        w, h = int(rng.integers(W // 8, W // 2)), int(rng.integers(H // 10, H // 3))
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=_shade(camera.background,
                                                              float(rng.uniform(0.7, 1.3))))

    fig_h = H * camera.scale
    top = H * 0.95 - fig_h  # feet stand on the floor band
    cx = W / 2 + camera.shift * W
    u = fig_h / 100.0  # figure unit: the figure is 100 units tall
    skin = A.SKIN_TONES[person.skin]
    upper = A.PALETTE[person.upper_colour]
    lower = A.PALETTE[person.lower_colour]
    hair = A.HAIR_COLOURS[person.hair_colour]

    def box(x0, y0, x1, y1, fill, shape="rect"):
        xy = [cx + x0 * u, top + y0 * u, cx + x1 * u, top + y1 * u]
        if shape == "ellipse":
            d.ellipse(xy, fill=fill)
        else:
            d.rectangle(xy, fill=fill)

    shoulder = 11 if person.gender == "man" else 9.5
    waist_y, hip_y, ankle_y = 47, 50, 95
    swing = camera.arm_swing * s / u
    spread = camera.leg_spread * s / u

    # Long hair and backpacks sit behind the body.
    if person.hair_length == "long":
        box(-7, 4, 7, 30, hair)
    if person.bag == "backpack":
        box(shoulder - 2, 20, shoulder + 5, 44, A.PALETTE[person.bag_colour])

    # Legs, then what covers them.
    for side in (-1, 1):
        x = side * (4.5 + spread)
        box(x - 4, hip_y, x + 4, ankle_y, skin)
        if person.lower_type in ("trousers", "jeans"):
            box(x - 4.2, hip_y, x + 4.2, ankle_y, lower)
            if person.lower_type == "jeans":  # a lighter seam down each leg
                box(x - 0.6, hip_y + 4, x + 0.6, ankle_y, _shade(lower, 1.35))
        elif person.lower_type == "shorts":
            box(x - 4.4, hip_y, x + 4.4, hip_y + 17, lower)
        box(x - 4.5, ankle_y - 1, x + 5.5, ankle_y + 4, A.PALETTE[person.shoes], "ellipse")
    if person.lower_type == "skirt":
        d.polygon([(cx - 9 * u, top + (waist_y - 1) * u), (cx + 9 * u, top + (waist_y - 1) * u),
                   (cx + 14 * u, top + 72 * u), (cx - 14 * u, top + 72 * u)], fill=lower)
    elif person.lower_type != "skirt":
        box(-9, waist_y - 1, 9, hip_y + 3, lower)  # hips

    # Arms: sleeves per garment type, skin below short sleeves.
    long_sleeves = person.upper_type != "t-shirt"
    for side in (-1, 1):
        x = side * (shoulder + 2.5)
        hand_dx = side * swing
        d.polygon([(cx + (x - 2.5) * u, top + 20 * u), (cx + (x + 2.5) * u, top + 20 * u),
                   (cx + (x + 2.5 + hand_dx) * u, top + 58 * u),
                   (cx + (x - 2.5 + hand_dx) * u, top + 58 * u)],
                  fill=upper if long_sleeves else skin)
        if not long_sleeves:
            box(x - 3, 19, x + 3, 31, upper)
        box(x - 2.5 + hand_dx, 57, x + 2.5 + hand_dx, 62, skin, "ellipse")
        if person.bag == "handbag" and side == 1:
            box(x - 3.5 + hand_dx, 60, x + 4.5 + hand_dx, 70, A.PALETTE[person.bag_colour])

    # Torso by garment type.
    box(-shoulder, 18, shoulder, waist_y, upper)
    if person.upper_type == "jacket":  # open front shows a contrasting shirt
        inner = (235, 235, 232) if sum(upper) < 380 else (30, 30, 35)
        box(-2.2, 19, 2.2, waist_y, inner)
    elif person.upper_type == "sweater":  # ribbed hem and cuffs
        box(-shoulder, waist_y - 4, shoulder, waist_y, _shade(upper, 0.7))
    elif person.upper_type == "long-sleeved shirt":  # a collar
        box(-4, 18, 4, 21, _shade(upper, 1.4))
    if person.bag == "shoulder bag":
        colour = A.PALETTE[person.bag_colour]
        d.line([(cx - shoulder * u, top + 19 * u), (cx + shoulder * u, top + 46 * u)],
               fill=_shade(colour, 0.8), width=max(1, int(1.6 * u)))
        box(shoulder - 3, 43, shoulder + 6, 53, colour)
    if person.bag == "backpack":  # straps over the shoulders
        strap = _shade(A.PALETTE[person.bag_colour], 0.8)
        for x in (-shoulder + 3, shoulder - 3):
            box(x - 1, 18, x + 1, 38, strap)

    # Neck, head, hair, hat, glasses.
    box(-2.5, 14, 2.5, 19, skin)
    box(-6, 2, 6, 16, skin, "ellipse")
    box(-6.5, 1, 6.5, 7, hair, "ellipse")
    box(-6.5, 3.5, -4.5, 9, hair)
    box(4.5, 3.5, 6.5, 9, hair)
    if person.hat == "cap":
        colour = A.PALETTE[person.hat_colour]
        box(-6.8, 0, 6.8, 6, colour, "ellipse")
        box(-6.8, 3, 6.8, 5.5, colour)
        box(3, 4, 10, 6, _shade(colour, 0.8))  # brim
    elif person.hat == "beanie":
        box(-7, -2, 7, 7, A.PALETTE[person.hat_colour], "ellipse")
        box(-7, 3.5, 7, 7, _shade(A.PALETTE[person.hat_colour], 0.8))
    if person.glasses:
        box(-5, 8, 5, 9.6, (15, 15, 15))
        box(-4.5, 7.5, -1, 10.5, (40, 40, 45), "ellipse")
        box(1, 7.5, 4.5, 10.5, (40, 40, 45), "ellipse")

    img = img.filter(ImageFilter.GaussianBlur(0.4 * s))
    img = img.resize((width, height), Image.Resampling.LANCZOS)
    if camera.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32)
    arr = (arr - 128.0) * camera.contrast + 128.0
    arr = arr * camera.light + rng.normal(0.0, camera.noise, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# What people of one outfit group share: gender (a skirt needs a woman) and every garment.
OUTFIT = ("gender", "upper_type", "upper_colour", "lower_type", "lower_colour", "shoes")


def sample_identities(n: int, rng: np.random.Generator, taken: set[tuple],
                      outfit_group: int = 1) -> list[Person]:
    """``n`` people whose attribute combinations are unique (also against ``taken``), drawn
    in groups of ``outfit_group`` who wear the same clothes and differ in hair, bag, hat or
    glasses: with groups, garments alone cannot tell a person from the rest of the group, so
    a retriever must learn what the questions about the rest ask."""
    people: list[Person] = []
    outfit: dict[str, Any] = {}
    while len(people) < n:
        if len(people) % outfit_group:
            p = replace(A.sample_person(rng, gender=outfit["gender"]), **outfit)
        else:
            p = A.sample_person(rng)
        if p.key not in taken:
            taken.add(p.key)
            people.append(p)
            if (len(people) - 1) % outfit_group == 0:
                outfit = {f: getattr(p, f) for f in OUTFIT}
    return people


def make_record(person: Person, pid: int, split: str, file_path: str, n_questions: int,
                rng: np.random.Generator, facts: tuple[str, ...] | None = None,
                fact_sets: Sequence[tuple[str, ...]] = A.INITIAL_FACTS) -> dict[str, Any]:
    """One image's annotation record in the Interactive-PEDES shape; the initial description
    gives ``facts`` (drawn from ``fact_sets`` when None) and the questions ask about the
    rest."""
    if facts is None:
        facts = fact_sets[int(rng.integers(len(fact_sets)))]
    known = A.slots_of(facts)
    slots = [s for s in A.SLOTS if s not in known]
    slots = [slots[i] for i in rng.permutation(len(slots))][:n_questions]
    questions, answers = [], []
    for slot in slots:
        _, q, a = A.question_answer(person, slot, rng)
        questions.append(q)
        answers.append(a)
    return {
        "id": pid,
        "split": split,
        "file_path": file_path,
        "initial_description": A.initial_description(person, facts, rng),
        "fine-grained_description": A.fine_grained_description(person, rng),
        "questions": questions,
        "answers": answers,
        "captions": [A.caption(person)],
    }


def plan_dataset(synthetic_cfg: dict[str, Any], seed: int):
    """(records, [(relative path, person, camera seed keys)]) without rendering anything."""
    rng = _rng(seed, 0)
    counts = [synthetic_cfg["identities"][s] for s in SPLITS]
    total = sum(counts)
    # Non-contiguous, shuffled identity numbers: the loader maps them to class ids.
    pids = (rng.permutation(3 * total)[:total] + 1000).tolist()
    fact_sets = [A.check_fact_set(f) for f in synthetic_cfg.get("initial_facts", A.INITIAL_FACTS)]
    taken: set[tuple] = set()
    records, jobs = [], []
    start = 0
    for split_no, (split, count) in enumerate(zip(SPLITS, counts, strict=True)):
        people = sample_identities(count, _rng(seed, 1, split_no), taken,
                                   synthetic_cfg.get("outfit_group", 1))
        for person, pid in zip(people, pids[start : start + count], strict=True):
            for cam in range(synthetic_cfg["images_per_identity"]):
                rel = f"images/{split}/{pid:05d}_c{cam}.png"
                rec_rng = _rng(seed, 2, pid, cam)
                records.append(make_record(person, pid, split, rel,
                                           synthetic_cfg["questions_per_image"], rec_rng,
                                           fact_sets=fact_sets))
                jobs.append((rel, person, (seed, 3, pid, cam)))
        start += count
    return records, jobs


def render_job(person: Person, keys: tuple[int, ...], height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(list(keys))
    return render(person, sample_camera(rng), height, width, rng)


def transfer_captions(record: dict[str, Any], person: Person, fact_sets, seed: int,
                      keys: tuple[int, ...]) -> list[str]:
    """Two captions of a test image for the caption-benchmark copy: its initial description
    and a second, equally vague one (own random stream: the annotations stay as they are)."""
    rng = _rng(seed, 4, *keys[2:])
    facts = fact_sets[int(rng.integers(len(fact_sets)))]
    return [record["initial_description"], A.initial_description(person, facts, rng)]


def write_transfer_files(images: Path, records, jobs, synthetic_cfg: dict[str, Any],
                         seed: int) -> None:
    """Beside the images: ``drawn.json`` (what the renderer drew in each image, for the
    rendered answerer) and ``data_captions.json``, the test split in RSTPReid's layout
    (``img_path`` relative to this folder), so a transfer run can evaluate on it."""
    drawn = {str(Path(rel).relative_to("images")): asdict(person) for rel, person, _ in jobs}
    (images / "drawn.json").write_text(json.dumps(drawn, indent=0) + "\n")
    fact_sets = [A.check_fact_set(f) for f in synthetic_cfg.get("initial_facts", A.INITIAL_FACTS)]
    rstp = [{"id": rec["id"], "img_path": str(Path(rel).relative_to("images")),
             "captions": transfer_captions(rec, person, fact_sets, seed, keys), "split": "test"}
            for rec, (rel, person, keys) in zip(records, jobs, strict=True)
            if rec["split"] == "test"]
    (images / "data_captions.json").write_text(json.dumps(rstp, indent=1) + "\n")


def run(cfg: dict[str, Any], out_dir: str) -> None:
    synthetic_cfg = cfg["data"]["synthetic"]
    out = Path(out_dir)
    started = time.time()
    records, jobs = plan_dataset(synthetic_cfg, cfg["seed"])
    with atomic_dir(out / "images") as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        for rel, person, keys in jobs:
            img = render_job(person, keys, synthetic_cfg["image_height"],
                             synthetic_cfg["image_width"])
            img.save(tmp / Path(rel).relative_to("images"), format="PNG", optimize=False)
        write_transfer_files(tmp, records, jobs, synthetic_cfg, cfg["seed"])
    with atomic_path(out / "annotations.json") as tmp:
        tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    log.info("%d identities, %d images in %.1fs -> %s",
             sum(synthetic_cfg["identities"].values()), len(records), time.time() - started, out)
