"""The synthetic pedestrian generator: record shape, uniqueness, determinism, atomic output."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest

from llava_reid.data import attributes as A
from llava_reid.data import synthetic
from llava_reid.data.annotations import load_annotations
from tests.conftest import small_config


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    cfg = small_config()
    synthetic.run(cfg, str(out))
    return out, cfg, json.loads((out / "annotations.json").read_text())


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_records_have_the_interactive_pedes_shape(generated):
    out, cfg, records = generated
    syn = cfg["data"]["synthetic"]
    assert len(records) == sum(syn["identities"].values()) * syn["images_per_identity"]
    for r in records:
        assert set(r) == {"id", "split", "file_path", "initial_description",
                          "fine-grained_description", "questions", "answers", "captions"}
        assert isinstance(r["id"], int) and r["split"] in ("train", "val", "test")
        assert r["initial_description"].startswith(("I saw", "There was", "I remember"))
        assert r["fine-grained_description"].startswith("I saw")
        assert len(r["questions"]) == len(r["answers"]) >= 7
        assert all(q.endswith("?") or re.search(r"\? A\) ", q) for q in r["questions"])
        assert (out / r["file_path"]).is_file()
    # The project's own validating loader accepts it.
    df = load_annotations(out / "annotations.json", out)
    assert len(df) == len(records)


def test_identities_never_cross_splits_and_pids_are_not_contiguous(generated):
    _, cfg, records = generated
    split_of: dict[int, set[str]] = {}
    for r in records:
        split_of.setdefault(r["id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    counts = Counter(next(iter(s)) for s in split_of.values())
    assert counts == cfg["data"]["synthetic"]["identities"]
    train = sorted(p for p, s in split_of.items() if s == {"train"})
    assert train != list(range(train[0], train[0] + len(train)))


def test_attribute_combinations_are_unique_per_split():
    rng = np.random.default_rng(0)
    taken: set[tuple] = set()
    people = synthetic.sample_identities(300, rng, taken)
    assert len({p.key for p in people}) == 300 == len(taken)
    # Vague descriptions collide: many people share gender + top colour.
    groups = Counter((p.gender, p.upper_colour) for p in people)
    assert max(groups.values()) >= 10


def test_outfit_groups_share_clothes_and_differ_in_the_rest():
    people = synthetic.sample_identities(30, np.random.default_rng(0), set(), outfit_group=3)
    assert len({p.key for p in people}) == 30
    for start in range(0, 30, 3):
        group = people[start:start + 3]
        assert len({tuple(getattr(p, f) for f in synthetic.OUTFIT) for p in group}) == 1
    assert len({p.upper_colour for p in people}) > 3  # groups draw their own clothes
    # Women of a group may wear a skirt; men never do.
    assert all(p.lower_type != "skirt" for p in people if p.gender == "man")
    # A group of one is the plain draw: same people from the same stream.
    plain = synthetic.sample_identities(10, np.random.default_rng(1), set())
    assert synthetic.sample_identities(10, np.random.default_rng(1), set(), 1) == plain


def test_questions_skip_what_the_initial_description_says():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        person = A.sample_person(rng)
        for facts in A.INITIAL_FACTS:
            rec = synthetic.make_record(person, 5, "test", "x.png", 9, rng, facts=facts)
            answers = " ".join(rec["answers"]).lower()
            for slot in facts:
                assert A.statement(person, slot)[:-1].lower() not in answers
            asked = [s for s in A.SLOTS if A.statement(person, s)[:-1].lower() in answers]
            assert len(asked) == len(A.SLOTS) - len(facts)


def test_configured_fact_sets_shape_the_initial_description():
    three = [("upper_colour", "upper_type", "lower_type"),
             ("upper_colour", "lower_colour", "lower_type")]
    cfg = small_config()
    cfg["data"]["synthetic"]["initial_facts"] = [list(f) for f in three]
    records, jobs = synthetic.plan_dataset(cfg["data"]["synthetic"], cfg["seed"])
    people = {rel: person for rel, person, _ in jobs}
    for rec in records:
        p = people[rec["file_path"]]
        text = rec["initial_description"]
        # Both sets name the upper colour and the lower garment; the rest of the outfit only
        # in the questions.
        assert p.upper_colour in text and p.lower_type in text, text
        answers = " ".join(rec["answers"]).lower()
        for slot in ("upper_colour", "lower_type"):
            assert A.statement(p, slot)[:-1].lower() not in answers
        assert len(rec["questions"]) == len(A.SLOTS) - 3


@pytest.mark.parametrize("facts, message", [
    (["lower_colour"], "lower_colour needs lower_type"),
    (["upper_colour", "shoes"], "need distinct names"),
    (["upper_type", "upper_type"], "need distinct names"),
])
def test_bad_fact_sets_are_refused(facts, message):
    with pytest.raises(ValueError, match=message):
        A.check_fact_set(facts)


def test_answer_styles_all_occur(generated):
    _, _, records = generated
    answers = [a for r in records for a in r["answers"]]
    yes_no = sum(a.startswith(("Yes, ", "No, ")) for a in answers)
    choice = sum(bool(re.match(r"^[ABC]\) ", a)) for a in answers)
    descriptive = len(answers) - yes_no - choice
    n = len(answers)
    assert 0.25 < yes_no / n < 0.55
    assert 0.03 < choice / n < 0.2
    assert 0.3 < descriptive / n < 0.65
    # Multiple-choice answers name the letter of the true option.
    for r in records:
        for q, a in zip(r["questions"], r["answers"], strict=True):
            m = re.match(r"^([ABC])\) ", a)
            if m:
                option = re.search(rf"{m.group(1)}\) (\w[\w-]*)", q).group(1)
                assert option in a[3:]


def test_same_seed_same_bytes_other_seed_differs(generated, tmp_path):
    out, cfg, _ = generated
    again = tmp_path / "again"
    synthetic.run(cfg, str(again))
    assert _digest(again) == _digest(out)
    other_cfg = copy.deepcopy(cfg)
    other_cfg["seed"] += 1
    other = tmp_path / "other"
    synthetic.run(other_cfg, str(other))
    assert (other / "annotations.json").read_bytes() != (out / "annotations.json").read_bytes()


def test_images_show_the_garment_colour_and_cameras_differ():
    rng = np.random.default_rng(0)
    person = A.sample_person(rng)
    imgs = [np.asarray(synthetic.render_job(person, (0, 3, 1, cam), 192, 64)).astype(float)
            for cam in range(3)]
    assert imgs[0].shape == (192, 64, 3)
    assert not np.array_equal(imgs[0], imgs[1])
    # Render the same person on a plain camera and read the torso colour.
    plain = synthetic.Camera(background=(128, 128, 128), floor=(100, 100, 100), light=1.0,
                             contrast=1.0, scale=0.85, shift=0.0, arm_swing=0.0,
                             leg_spread=0.0, flip=False, noise=0.0, clutter=0)
    img = np.asarray(synthetic.render(person, plain, 192, 64, np.random.default_rng(0)))
    # Torso spans figure units 18..47 from the top; sample a patch left of centre
    # (a jacket's open front sits at the centre).
    top = 192 * 0.95 - 192 * 0.85
    y = int(top + 192 * 0.85 * 0.30)
    patch = img[y - 2 : y + 2, 32 - 7 : 32 - 4].reshape(-1, 3).mean(0)
    assert np.abs(patch - np.array(A.PALETTE[person.upper_colour])).max() < 30


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    cfg = small_config()
    calls = {"n": 0}
    real = synthetic.render_job

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_job", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        synthetic.run(cfg, str(tmp_path))
    assert not (tmp_path / "annotations.json").exists()
    assert not (tmp_path / "images").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
