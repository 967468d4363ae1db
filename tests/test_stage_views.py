"""Each stage is passed exactly the config keys it reads.

The table below says, for every leaf key of config.yaml, which stages read it: editing that key
must rerun those stages (and what follows) and no other. It is checked against the views the
rules really pass (one dry run prints every job's ``--config``), and the CLI refuses a stage
that reads a key its view lacks.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import typing

import pytest

from llava_reid.dialogue.evaluate import EvaluateConfig, QuestionerEvaluation, results_settings
from llava_reid.dialogue.merge import MergeConfig
from llava_reid.dialogue.prepare_data import PrepareConfig
from llava_reid.questioner.train import SFTConfig
from llava_reid.questioner.visual_cache import VisualCacheConfig
from llava_reid.retriever.features import FeaturesConfig
from llava_reid.retriever.train import RetrieverTrainingConfig
from llava_reid.runtime import config_hash
from llava_reid.selector.joint import JointConfig
from llava_reid.selector.warmup import WarmupConfig
from llava_reid.stage_views import (
    STAGE_KEYS,
    ConfigKeyNotPassed,
    StageConfig,
    _optional,
    cut_view,
    stage_keys,
    typed_view,
)
from tests.conftest import base_config, dry_run, llava_reid, small_config, write_config

ALL = set(STAGE_KEYS) | {"evaluate:questioner"}
EVAL = {"evaluate", "evaluate:questioner"}
QUESTIONER_TRAINING = {"train-questioner", "train-joint"}

# Longest matching prefix wins. "evaluate" = the baselines' chunks (initial, random, oracle);
# "evaluate:questioner" = the chunks of the methods that run the questioner.
READERS: dict[str, set[str]] = {
    "run": set(),
    "results": set(),
    "seed": ALL,
    "device": ALL,
    "data": {"load-annotations"},
    "data.synthetic": {"synthesize", "load-annotations"},
    "retriever": {"train-retriever"},
    "retriever.checkpoint": {"train-retriever", "import-retriever"},
    "retriever.pretrained": {"init-retriever", "train-retriever", "import-retriever"},
    "retriever.temperature": {"train-retriever", "import-retriever"},
    "retriever.eval_batch_size": {"train-retriever", "import-retriever"},
    "retriever.tiny": {"init-retriever", "train-retriever"},
    "retriever.text_length": {"init-retriever", "train-retriever"},
    "retriever.image_height": {"init-retriever", "train-retriever", "import-retriever"},
    "retriever.image_width": {"init-retriever", "train-retriever", "import-retriever"},
    "features": {"cache-features"},
    "features.batch_size": {"cache-features", "train-joint", *EVAL},
    "dialogue.rounds": {"prepare-data", *EVAL},
    "dialogue.pool_size": {"prepare-data", "warmup-selector", "train-joint", *EVAL},
    "dialogue.num_candidates": {"train-questioner", "warmup-selector", "train-joint",
                                "evaluate:questioner"},
    "prepare": {"prepare-data"},
    "questioner.tiny": {"build-tiny-questioner"},
    "questioner.pretrained": set(),  # chooses the base model folder: an input, not a param
    "questioner.pool_ratio": {"cache-visual-tokens", *QUESTIONER_TRAINING,
                              "evaluate:questioner"},
    "questioner.image_mean": {"cache-visual-tokens", *QUESTIONER_TRAINING,
                              "evaluate:questioner"},
    "questioner.image_std": {"cache-visual-tokens", *QUESTIONER_TRAINING,
                             "evaluate:questioner"},
    "questioner.cache_batch_size": {"cache-visual-tokens"},
    "questioner.load_in_4bit": QUESTIONER_TRAINING,
    "questioner.train_projector": {*QUESTIONER_TRAINING, "import-questioner", "import-selector"},
    "questioner.checkpoint": {"import-questioner"},
    "questioner.lora": QUESTIONER_TRAINING,
    "questioner.sft": QUESTIONER_TRAINING,
    "selector": {"warmup-selector"},
    "selector.checkpoint": {"warmup-selector", "import-selector"},
    "selector.heads": {"warmup-selector", "import-selector"},
    "selector.dropout": {"warmup-selector", "import-selector"},
    "joint": {"train-joint"},
    "answerer": EVAL,
    "evaluate.chunks": set(),  # the chunk count is in the output names, not a param
    "evaluate.methods": set(),  # which methods run: the DAG's targets
    "evaluate.generation": {"evaluate:questioner"},
    "evaluate.auxiliary_similarity": {*EVAL, "merge-eval"},
    "report": {"plots", "ranked-lists"},
}


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{path}.")
        else:
            yield path


def _readers(key: str) -> set[str]:
    matches = [p for p in READERS if key == p or key.startswith(p + ".")]
    assert matches, f"config key {key!r} has no row in READERS: say which stages read it"
    return READERS[max(matches, key=len)]


def _views_containing(key: str) -> set[str]:
    found = set()
    for stage in STAGE_KEYS:
        methods = ("initial", "questioner") if stage == "evaluate" else (None,)
        for method in methods:
            keys = stage_keys(stage, method)
            if any(key == k or key.startswith(k + ".") for k in keys):
                found.add("evaluate:questioner" if method == "questioner" else stage)
    return found


@pytest.mark.parametrize("key", sorted(_leaves(base_config())))
def test_every_config_key_reaches_exactly_its_readers(key):
    assert _views_containing(key) == _readers(key)


def test_the_rules_pass_the_declared_views(tmp_path):
    """A dry run prints every job's command: its --config is the table's view, and editing one
    key changes exactly the commands of the stages that read it."""
    def commands(cfg: dict) -> dict[str, str]:
        proc = dry_run(tmp_path, write_config(tmp_path / "cfg.yaml", cfg),
                       args=["-p", "--forceall"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = {}
        for line in proc.stdout.splitlines():
            if "llava-reid" not in line or "--config" not in line:
                continue
            argv = shlex.split(line[line.index("llava-reid"):].split(" > ")[0])
            stage = next(a for a in argv[1:] if not a.startswith("-") and not a.isdigit())
            method = argv[argv.index("--method") + 1] if stage == "evaluate" else None
            view = json.loads(argv[argv.index("--config") + 1])
            assert view == cut_view(cfg, stage_keys(stage, method)), (stage, method)
            name = "evaluate:questioner" if method in ("questioner", "selector") else stage
            found[name] = json.dumps(view, sort_keys=True)
        return found

    cfg = small_config()
    before = commands(cfg)
    # Published-weight imports replace training only when a checkpoint is configured; our
    # retriever's scores are exported only for a run that fuses them.
    assert set(before) == {s for s in ALL
                           if not s.startswith("import-") and s != "export-similarity"}
    edited = json.loads(json.dumps(cfg))
    edited["dialogue"]["num_candidates"] += 1
    after = commands(edited)
    changed = {s for s in before if before[s] != after[s]}
    assert changed == _readers("dialogue.num_candidates")
    assert "prepare-data" not in changed and "evaluate" not in changed


def test_a_stage_reading_a_key_it_was_not_passed_fails_loudly():
    cfg = base_config()
    view = StageConfig.wrap(cut_view(cfg, stage_keys("prepare-data")), "prepare-data")
    assert view["dialogue"]["rounds"] == cfg["dialogue"]["rounds"]
    assert view["prepare"]["random_history"] == cfg["prepare"]["random_history"]
    for read in (lambda v: v["dialogue"]["num_candidates"],
                 lambda v: v["dialogue"].get("num_candidates", 4),
                 lambda v: v["questioner"]):
        with pytest.raises(ConfigKeyNotPassed, match="prepare-data"):
            read(view)
    assert "num_candidates" not in view["dialogue"] and "questioner" not in view
    # A section passed whole is a plain mapping; the view still serialises as the rule sent it.
    assert type(view["prepare"]) is dict
    assert json.loads(json.dumps(view)) == cut_view(cfg, stage_keys("prepare-data"))


# stage -> its typed view, and the sections of its view that its artifacts' tag hashed whole
# before typed views existed (None: no tag).
TYPED_VIEWS = {
    "train-joint": (JointConfig, ("questioner", "joint", "dialogue", "seed")),
    "train-questioner": (SFTConfig, ("questioner", "dialogue", "seed")),
    "train-retriever": (RetrieverTrainingConfig, None),
    "warmup-selector": (WarmupConfig, ("selector", "dialogue", "seed")),
    "prepare-data": (PrepareConfig, ("prepare", "dialogue", "seed")),
    "cache-features": (FeaturesConfig, ("features",)),
    "cache-visual-tokens": (VisualCacheConfig, None),
    "evaluate": (EvaluateConfig, None),  # its tag: test_evaluate_tags_are_unchanged
    "merge-eval": (MergeConfig, None),
}


def _no_defaults(cls) -> None:
    """The schema is the one source of defaults: no field of a view declares one."""
    views = [cls]
    while views:
        cls = views.pop()
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING, (cls.__name__, field.name)
            assert field.default_factory is dataclasses.MISSING, (cls.__name__, field.name)
            kind, _ = _optional(typing.get_type_hints(cls)[field.name])
            views += [kind] if dataclasses.is_dataclass(kind) else []


@pytest.mark.parametrize("stage", sorted(TYPED_VIEWS))
def test_a_typed_view_is_built_from_the_stage_view_alone(stage):
    cfg = base_config()
    view = StageConfig.wrap(cut_view(cfg, stage_keys(stage)), stage)
    cls, tagged = TYPED_VIEWS[stage]
    settings = typed_view(cls, view)
    if hasattr(settings, "seed"):
        assert (settings.seed, settings.device) == (cfg["seed"], cfg["device"])
    _no_defaults(cls)
    # The artifacts' tag is the hash of the sections the stage was passed, as before views.
    if tagged is not None:
        sections = {k: view[k] for k in tagged if k in view}
        assert config_hash(settings.tag()) == config_hash(sections)


def _tag_before_views(view: dict, method: str) -> dict:
    """evaluate's tag as computed from the raw view before typed views (the reference)."""
    tag = {k: view[k] for k in ("seed", "dialogue", "questioner", "answerer", "evaluate")
           if k in view}
    answerer = dict(tag["answerer"])
    for section, keys in {"openai": ("base_url", "api_key_env", "max_concurrency", "timeout_s",
                                     "max_retries"),
                          "sglang": ("port", "gpu", "mem_fraction_static",
                                     "startup_timeout_s")}.items():
        answerer[section] = {k: v for k, v in answerer[section].items() if k not in keys}
    tag["answerer"] = answerer
    return tag | {"method": method}


@pytest.mark.parametrize("method", ["initial", "oracle", "questioner", "selector"])
@pytest.mark.parametrize("auxiliary", [None, {"path": None, "weight": 0.5},
                                       {"path": "irra.parquet", "weight": 0.3}])
def test_evaluate_tags_are_unchanged(method, auxiliary):
    """A chunk's tag decides whether an interrupted chunk resumes: typed views keep it."""
    cfg = base_config()
    cfg["answerer"]["openai"]["base_url"] = "http://localhost:1"
    if auxiliary is None:
        del cfg["evaluate"]["auxiliary_similarity"]
    else:
        cfg["evaluate"]["auxiliary_similarity"] = auxiliary
    view = StageConfig.wrap(cut_view(cfg, stage_keys("evaluate", method)), "evaluate", method)
    settings = typed_view(EvaluateConfig, view)
    asking = (typed_view(QuestionerEvaluation, view) if method in ("questioner", "selector")
              else None)
    _no_defaults(QuestionerEvaluation)
    assert config_hash(results_settings(settings, asking, method)) == config_hash(
        _tag_before_views(view, method))
    if asking is None:  # the baselines are not passed the questioner's keys
        with pytest.raises(ConfigKeyNotPassed):
            typed_view(QuestionerEvaluation, view)


def test_a_typed_view_of_a_key_the_rule_does_not_pass_fails_loudly():
    # train-questioner's rule passes no ``joint`` section: the joint view cannot be built.
    view = StageConfig.wrap(cut_view(base_config(), stage_keys("train-questioner")),
                            "train-questioner")
    with pytest.raises(ConfigKeyNotPassed, match="'joint'"):
        typed_view(JointConfig, view)


def test_the_cli_refuses_a_stage_that_reads_more_than_its_view(tmp_path, monkeypatch):
    """Even a whole config passed inline is cut to the stage's keys when read."""
    monkeypatch.setitem(STAGE_KEYS, "synthesize", ("data.synthetic.identities",))
    from llava_reid import cli

    cfg = small_config()
    with pytest.raises(ConfigKeyNotPassed, match=r"synthesize.*data\.synthetic\.(initial_facts|images_per_identity)"):
        cli.main(["synthesize", "--config", json.dumps(cfg), "--out-dir", str(tmp_path)])
    # The real table passes what the stage reads: the same call succeeds through the CLI.
    proc = llava_reid("synthesize", "--out-dir", str(tmp_path / "ok"), cfg=cfg, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"annotations\.json", "".join(p.name for p in (tmp_path / "ok").iterdir()))
