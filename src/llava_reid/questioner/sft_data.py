"""SFT examples from ``prepare/conversations.parquet``: prompt, candidate images, target.

Each row of the conversations artifact is one step of a look-ahead dialogue: the dialogue so
far, the question whose answer the oracle chose, a template id and the top-N retrieval pool of
the query so far. The questioner is shown the top ``num_candidates`` of that pool (the
candidate person, then the similar persons, in rank order) and learns to ask the oracle's
question. Joint training replaces the plain top-k by the selector's choice from the same pool.

A seeded fraction of IMAGES (not rows, so no dialogue leaks) is held out to measure the
held-out loss and the generated questions.

The look-ahead's labels are not equally informative: once the target ranks first, every
answer keeps it there and the label is only the widest margin, while the question whose answer
lifts the target from rank 40 to 3 is what the questioner is for. ``repeat_by_gain`` repeats
each training example in proportion to its label's gain (``label_gain``, log-rank), so an epoch
weights the labels by how much they move the target and leaves out those that move nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from llava_reid.artifacts import ArtifactError, read_table
from llava_reid.questioner.prompts import PromptParts, build_prompt


@dataclass(frozen=True)
class GainRepeats:
    """``questioner.sft.repeat_by_gain``: example repeats per epoch = round(gain / unit)."""

    unit: float
    max_repeats: int


@dataclass(frozen=True)
class Example:
    example_id: int
    image_idx: int
    round: int
    prompt_args: tuple  # (template_id, initial, history questions, history answers)
    target: str
    pool: tuple[int, ...]  # top-N image_idx of the query so far, best first
    label_gain: float  # ln(rank before) - ln(rank after) of the target question's answer

    def prompt(self, num_images: int) -> PromptParts:
        template_id, initial, questions, answers = self.prompt_args
        return build_prompt(template_id, num_images, initial, questions, answers)

    def top_k(self, k: int) -> list[int]:
        return list(self.pool[:k])

    def text_length(self) -> int:
        """Characters of the prompt text and target: a tokenizer-free proxy of the sequence
        length (image slots are the same for every example), for length-grouped batches."""
        return len(self.prompt(1).as_text()) + len(self.target)


def load_examples(conversations: str) -> list[Example]:
    table: pd.DataFrame = read_table(conversations, "conversations").to_pandas()
    out = []
    for row in table.itertuples(index=False):
        out.append(Example(
            example_id=int(row.example_id),
            image_idx=int(row.image_idx),
            round=int(row.round),
            prompt_args=(int(row.template_id), row.initial_description,
                         tuple(row.history_questions), tuple(row.history_answers)),
            target=row.target_question,
            pool=tuple(int(x) for x in row.pool),
            label_gain=float(row.label_gain),
        ))
    if not out:
        raise ArtifactError(f"{conversations}: no conversations")
    return out


def split_holdout(examples: list[Example], fraction: float, seed: int
                  ) -> tuple[list[Example], list[Example]]:
    """(train, held-out) by image: a seeded ``fraction`` of images goes to held-out."""
    images = sorted({e.image_idx for e in examples})
    rng = np.random.default_rng([seed, 23])
    n_hold = int(round(fraction * len(images))) if fraction > 0 else 0
    held = set(rng.permutation(images)[:n_hold].tolist())
    train = [e for e in examples if e.image_idx not in held]
    hold = [e for e in examples if e.image_idx in held]
    return train, hold


def repeat_by_gain(examples: list[Example], unit: float, max_repeats: int) -> list[Example]:
    """Each example ``round(label_gain / unit)`` times (at most ``max_repeats``; none when its
    label moved the target by less than half a ``unit``), in the given order."""
    out = []
    for e in examples:
        repeats = int(np.clip(np.round(e.label_gain / unit), 0, max_repeats))
        out += [e] * repeats
    if not out:
        raise ArtifactError(f"no example's label gain reaches half of repeat_by_gain.unit "
                            f"({unit}); lower the unit")
    return out
