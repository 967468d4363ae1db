"""Which config keys each stage reads: the one table the rules cut their views from.

A rule passes its stage exactly these keys (plus ``seed`` and ``device``) as the ``cfg`` param,
so Snakemake reruns a stage when, and only when, a key it reads changes. The CLI wraps an
inline view in :class:`StageConfig`, so a stage that reads a key its rule does not pass fails
at once, naming the key, instead of silently depending on a key whose edits would not rerun it.

A stage then reads its slice once, into a frozen dataclass (:func:`typed_view`), and passes
that on: its settings have names and types, and the schema stays their one source of defaults.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

# Always passed: every stage is seeded and placed on a device.
COMMON_KEYS = ("seed", "device")

# Image preprocessing and visual-token pooling: what loading the questioner reads.
QUESTIONER_INPUT = ("questioner.pool_ratio", "questioner.image_mean", "questioner.image_std")
# What building the questioner for training reads (the LoRA set-up and the SFT schedule).
QUESTIONER_TRAINING = (*QUESTIONER_INPUT, "questioner.load_in_4bit", "questioner.train_projector",
                       "questioner.lora", "questioner.sft")

# The evaluation methods (the schema's evaluate.methods enum), and those that run the
# questioner (the others are baselines).
METHODS = ("initial", "random", "oracle", "questioner", "selector")
QUESTIONER_METHODS = ("questioner", "selector")

STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "synthesize": ("data.synthetic",),
    "load-annotations": ("data",),
    "init-retriever": ("retriever.pretrained", "retriever.tiny", "retriever.text_length",
                       "retriever.image_height", "retriever.image_width"),
    "train-retriever": ("retriever",),
    "cache-features": ("features",),
    "prepare-data": ("prepare", "dialogue.rounds", "dialogue.pool_size"),
    "build-tiny-questioner": ("questioner.tiny",),
    "cache-visual-tokens": (*QUESTIONER_INPUT, "questioner.cache_batch_size"),
    "train-questioner": (*QUESTIONER_TRAINING, "dialogue.num_candidates"),
    "warmup-selector": ("selector", "dialogue.pool_size", "dialogue.num_candidates"),
    "train-joint": (*QUESTIONER_TRAINING, "joint", "dialogue.pool_size",
                    "dialogue.num_candidates", "features.batch_size"),
    "evaluate": ("answerer", "dialogue.rounds", "dialogue.pool_size", "features.batch_size",
                 "evaluate.auxiliary_similarity"),
    "import-retriever": ("retriever.checkpoint", "retriever.pretrained", "retriever.image_height",
                         "retriever.image_width", "retriever.temperature",
                         "retriever.eval_batch_size"),
    "import-questioner": ("questioner.checkpoint", "questioner.train_projector"),
    "import-selector": ("selector.checkpoint", "selector.heads", "selector.dropout",
                        "questioner.train_projector"),
    "merge-eval": ("evaluate.auxiliary_similarity",),
    "export-similarity": (),
    "plots": ("report",),
    "ranked-lists": ("report",),
    "training-curves": (),
}

# What the questioner's methods read on top of the baselines' evaluation keys.
EVALUATE_QUESTIONER = (*QUESTIONER_INPUT, "dialogue.num_candidates", "evaluate.generation")


def stage_keys(stage: str, method: str | None = None) -> tuple[str, ...]:
    """The dotted keys ``stage`` reads (``method`` for ``evaluate``), common keys first."""
    if stage not in STAGE_KEYS:
        raise KeyError(f"no config view declared for stage {stage!r}")
    keys = STAGE_KEYS[stage]
    if stage == "evaluate" and method in QUESTIONER_METHODS:
        keys = (*keys, *EVALUATE_QUESTIONER)
    return (*COMMON_KEYS, *keys)


def cut_view(config: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The sub-config holding exactly ``keys`` (top-level sections or dotted sub-keys); an
    optional key the config does not set is left out."""
    view: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        source = config
        for name in parents:
            source = source.get(name) or {}
        if leaf not in source:
            continue
        target = view
        for name in parents:
            target = target.setdefault(name, {})
        target[leaf] = source[leaf]
    return view


def stage_view_json(config: dict[str, Any], stage: str, method: str | None = None) -> str:
    """The JSON a rule passes as ``--config`` (sorted keys: a stable Snakemake param)."""
    return json.dumps(cut_view(config, stage_keys(stage, method)), sort_keys=True)


class ConfigKeyNotPassed(LookupError):
    """A stage read a config key that its rule does not pass it."""


def passed_tree(keys: Iterable[str]) -> dict[str, Any]:
    """Dotted keys as a tree: ``True`` marks a subtree passed whole."""
    tree: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = True
    return tree


class StageConfig(dict):
    """A stage's view whose partly passed sections refuse keys the rule did not pass.

    ``view["dialogue"]["num_candidates"]`` and ``.get`` of a key missing from a partly passed
    section raise :class:`ConfigKeyNotPassed` (``in`` answers False); sections passed whole
    behave as plain dicts.
    """

    def __init__(self, data: dict[str, Any], passed: dict[str, Any], stage: str,
                 path: str = ""):
        super().__init__()
        self._passed, self._stage, self._path = passed, stage, path
        for key, value in data.items():
            node = passed.get(key)
            if isinstance(node, dict) and isinstance(value, dict):
                value = StageConfig(value, node, stage, f"{path}{key}.")
            super().__setitem__(key, value)

    @classmethod
    def wrap(cls, view: dict[str, Any], stage: str, method: str | None = None) -> StageConfig:
        return cls(view, passed_tree(stage_keys(stage, method)), stage)

    def _check(self, key: object) -> None:
        if key not in self._passed:
            raise ConfigKeyNotPassed(
                f"stage {self._stage!r} read config key '{self._path}{key}', which its rule "
                f"does not pass: add it to STAGE_KEYS[{self._stage!r}] in "
                "llava_reid/stage_views.py")

    def __getitem__(self, key: Any) -> Any:
        self._check(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        # "Was I passed this?" is a fair question: an unpassed key is simply absent.
        return key in self._passed and super().__contains__(key)


View = TypeVar("View")


def config_key(path: str) -> Any:
    """A typed-view field read from the dotted config ``path`` instead of from the key of its
    own name in the section being read (no default: every value comes from the config)."""
    return dataclasses.field(metadata={"key": path})


def _optional(kind: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(kind, False)``."""
    args = typing.get_args(kind)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def typed_view(cls: type[View], section: Mapping[str, Any]) -> View:
    """The frozen dataclass ``cls`` filled from a validated config ``section``.

    Each field reads the key of its name, or the dotted path given by :func:`config_key`; a
    field whose type is itself a dataclass is filled from the sub-section it names. A field
    typed ``X | None`` is None where the config leaves that optional key out (the schema does
    not require it). Reads go through the mapping given, so from a :class:`StageConfig` a key
    the rule does not pass fails here, at once, naming the key. The dataclasses declare no
    defaults: the schema and config.yaml hold them, and the validated config carries them.
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        kind, optional = _optional(hints[field.name])
        value: Any = section
        try:
            for name in field.metadata.get("key", field.name).split("."):
                value = value[name]
        except KeyError:  # not ConfigKeyNotPassed: a key the rule does not pass still fails
            if not optional:
                raise
            value = None
        if value is not None and dataclasses.is_dataclass(kind):
            value = typed_view(kind, value)
        values[field.name] = value
    return cls(**values)
