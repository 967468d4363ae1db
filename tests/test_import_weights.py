"""Published weights as DAG inputs: `<section>.checkpoint` schedules an import in place of
training; IRRA's retriever and the original's questioner adapter and selector convert exactly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    REPO,
    dry_run,
    planned_inputs,
    planned_rules,
    sglang_stand_in_env,
    small_config,
    snakemake,
    write_config,
)

TRAINING_RULES = {"init_retriever", "train_retriever", "train_retriever_fold",
                  "cache_fold_features", "prepare_data", "train_questioner", "warmup_selector",
                  "train_joint"}


def _dry_run(work: Path, cfg: dict, *under: Path) -> subprocess.CompletedProcess:
    """`snakemake --dry-run` with ``cfg`` (on top of the ``under`` config files)."""
    return dry_run(work, *under, write_config(work / "config.yaml", cfg),
                   env=sglang_stand_in_env(work))


def _fake_checkpoints(work: Path) -> dict[str, Path]:
    paths = {"retriever": work / "irra" / "checkpoint.pth",
             "questioner": work / "original" / "adapter",
             "selector": work / "original" / "selector.pth"}
    paths["retriever"].parent.mkdir(parents=True)
    paths["retriever"].write_bytes(b"")
    paths["questioner"].mkdir(parents=True)
    paths["selector"].write_bytes(b"")
    return paths


def test_checkpoints_replace_every_training_job(tmp_path):
    paths = _fake_checkpoints(tmp_path)
    cfg = small_config()
    cfg["retriever"]["checkpoint"] = {"format": "irra", "path": str(paths["retriever"])}
    cfg["questioner"]["checkpoint"] = {"format": "llava-reid", "path": str(paths["questioner"])}
    cfg["selector"]["checkpoint"] = {"format": "llava-reid", "path": str(paths["selector"])}
    rules = planned_rules(_dry_run(tmp_path, cfg))
    assert {"import_retriever", "import_questioner", "import_selector", "evaluate",
            "merge_eval", "plots"} <= rules
    assert not rules & TRAINING_RULES, rules
    # Only test-split visual tokens: the train split's exist for training alone.
    proc = _dry_run(tmp_path, cfg)
    assert "visual_tokens/train.safetensors" not in proc.stdout


def test_retriever_checkpoint_alone_keeps_the_rest_of_training(tmp_path):
    paths = _fake_checkpoints(tmp_path)
    cfg = small_config()
    cfg["retriever"]["checkpoint"] = {"format": "ours", "path": str(paths["questioner"])}
    # Cross-fitted labels need fold retrievers trained with this workflow's recipe.
    proc = _dry_run(tmp_path, cfg)
    assert proc.returncode != 0
    assert "prepare.cross_fit: 0" in proc.stdout + proc.stderr
    cfg["prepare"]["cross_fit"] = 0
    rules = planned_rules(_dry_run(tmp_path, cfg))
    assert "import_retriever" in rules
    assert not rules & {"init_retriever", "train_retriever", "train_retriever_fold"}, rules
    assert {"prepare_data", "train_questioner", "warmup_selector", "train_joint"} <= rules


def test_questioner_checkpoint_without_selector_trains_the_joint_stage_from_it(tmp_path):
    paths = _fake_checkpoints(tmp_path)
    cfg = small_config()
    cfg["questioner"]["checkpoint"] = {"format": "ours", "path": str(paths["questioner"])}
    rules = planned_rules(_dry_run(tmp_path, cfg))
    assert "import_questioner" in rules and "train_questioner" not in rules
    assert {"train_retriever", "warmup_selector", "train_joint"} <= rules


def test_a_missing_checkpoint_stops_the_dag_naming_the_key(tmp_path):
    cfg = small_config()
    cfg["retriever"]["checkpoint"] = {"format": "irra", "path": str(tmp_path / "nope.pth")}
    proc = _dry_run(tmp_path, cfg)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "retriever.checkpoint.path" in message and "nope.pth" in message


def test_an_unknown_checkpoint_format_fails_validation(tmp_path):
    cfg = small_config()
    cfg["questioner"]["checkpoint"] = {"format": "irra", "path": str(tmp_path)}
    proc = _dry_run(tmp_path, cfg)
    assert proc.returncode != 0
    assert "irra" in proc.stdout + proc.stderr


def test_released_preset_schedules_no_training_job(tmp_path):
    """The preset on top of config.yaml, its /path/to placeholders pointed at local stand-ins."""
    text = (REPO / "workflow/presets/llava-reid-released.yaml").read_text()
    preset = yaml.safe_load(text.replace("/path/to", str(tmp_path)))
    files = [preset["data"]["annotations"], preset["retriever"]["checkpoint"]["path"]]
    folders = [preset["retriever"]["checkpoint"]["tokenizer"], preset["questioner"]["pretrained"],
               preset["questioner"]["checkpoint"]["path"], preset["selector"]["checkpoint"]["path"]]
    for folder in folders:
        Path(folder).mkdir(parents=True)
    for file in files:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        Path(file).write_text("{}")
    proc = _dry_run(tmp_path, preset, REPO / "config.yaml")
    rules = planned_rules(proc)
    assert {"import_retriever", "import_questioner", "import_selector", "evaluate"} <= rules
    assert not rules & TRAINING_RULES, rules
    assert "build_tiny_questioner" not in rules and "synthesize_data" not in rules
    assert "/results/llava-reid-released/" in proc.stdout or "results/llava-reid-released/" in proc.stdout
    # Its projector trains (train_projector): each evaluated adapter reads visual tokens made
    # by its own projector, the SFT adapter's and the jointly trained one's.
    evaluations = planned_inputs(proc, "evaluate")
    questioner = next(v for k, v in evaluations.items() if "method=questioner" in k)
    selector = next(v for k, v in evaluations.items() if "method=selector" in k)
    assert "questioner/visual_tokens/test.safetensors" in questioner
    assert "joint/visual_tokens/test.safetensors" in selector
    assert "questioner/visual_tokens" not in selector
    (sft_cache,) = planned_inputs(proc, "cache_visual_tokens").values()
    (joint_cache,) = planned_inputs(proc, "cache_joint_visual_tokens").values()
    assert "questioner/adapter" in sft_cache and "joint/adapter" not in sft_cache
    assert "joint/adapter" in joint_cache


@pytest.mark.parametrize("section", ["retriever", "questioner", "selector"])
def test_checkpoint_keys_default_to_null(section):
    assert small_config()[section]["checkpoint"] is None


# -- (a) IRRA's retriever: exact against open_clip's OpenAI-layout CLIP -------------------------

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def open_clip_model():
    """open_clip's model module, imported without the package's __init__. open_clip.utils
    imports torchvision (absent here) for one batch-norm class only: a stand-in module serves
    that import and is removed again at once, so nothing else ever sees it."""
    import importlib
    import importlib.util
    import types

    import transformers  # noqa: F401  (its own torchvision probe must not meet the stand-in)
    from torch import nn

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.fail("open_clip_torch is not installed (.ci/run installs it with --no-deps)")
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip.model"]
    stand_ins = {}
    if importlib.util.find_spec("torchvision") is None:
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (nn.BatchNorm2d,), {})
        stand_ins = {"torchvision": types.ModuleType("torchvision"),
                     "torchvision.ops": types.ModuleType("torchvision.ops"),
                     "torchvision.ops.misc": misc}
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.update(stand_ins)
    sys.modules.setdefault("open_clip", package)
    try:
        return importlib.import_module("open_clip.model")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def _clip_layout_tokenizer(folder: Path):
    """A word-level tokenizer in CLIP's id layout: words, then start and end of text last."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def _tiny_open_clip(oc, context: int, vocab: int, seed: int):
    import torch

    torch.manual_seed(seed)
    model = oc.CLIP(
        embed_dim=32,
        vision_cfg=oc.CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8,
                                    image_size=(48, 16)),
        text_cfg=oc.CLIPTextCfg(context_length=context, vocab_size=vocab, width=128, heads=2,
                                layers=2),
        quick_gelu=True,
    )
    # Random weights everywhere, layer norms and biases included (init leaves them 1 and 0).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_irra_checkpoint_gives_open_clips_features(tmp_path, open_clip_model):
    import torch
    import torch.nn.functional as F

    from llava_reid.retriever.encoder import RetrieverEncoder
    from tests.conftest import llava_reid

    oc = open_clip_model
    tokenizer = _clip_layout_tokenizer(tmp_path / "tokenizer")
    vocab = len(tokenizer)
    # IRRA stretches CLIP's 77 text positions to its own context (192) by linear interpolation.
    short = _tiny_open_clip(oc, context=12, vocab=vocab, seed=0)
    reference = _tiny_open_clip(oc, context=40, vocab=vocab, seed=1)
    state = short.state_dict()
    state["positional_embedding"] = F.interpolate(
        state["positional_embedding"].t()[None], size=40, mode="linear", align_corners=True)[0].t()
    reference.load_state_dict(state)
    assert reference.visual.positional_embedding.shape[0] == 6 * 2 + 1  # a 6x2 grid

    checkpoint = {f"base_model.{k}": v for k, v in reference.state_dict().items()}
    checkpoint["classifier.weight"] = torch.randn(7, 32)
    checkpoint["classifier.bias"] = torch.randn(7)
    checkpoint["cross_attn.in_proj_weight"] = torch.randn(96, 32)
    torch.save({"model": checkpoint}, tmp_path / "checkpoint.pth")

    cfg = {"retriever": {"image_height": 48, "image_width": 16, "temperature": 0.02}}
    out = tmp_path / "retriever"
    llava_reid("import-retriever", "--from", "irra", str(tmp_path / "checkpoint.pth"),
               "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(out), cfg=cfg)
    settings = yaml.safe_load((out / "retriever.json").read_text())
    assert (settings["image_height"], settings["image_width"], settings["text_length"]) == (48, 16, 40)

    encoder = RetrieverEncoder.from_pretrained(out, "cpu")
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 48, 16)
    with torch.inference_mode():
        ours = encoder.model.encode_image(pixels)
        theirs = reference.encode_image(pixels)
    assert ours.shape == theirs.shape == (3, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode_pixels(pixels), F.normalize(theirs, dim=-1),
                               atol=1e-5, rtol=0)

    texts = [" ".join(WORDS[i:i + n]) for i, n in ((0, 3), (5, 20), (30, 37))]
    ids, mask = encoder.tokenize(texts)
    padded = torch.zeros(len(texts), 40, dtype=torch.long)  # open_clip pads with 0 to its context
    padded[:, : ids.shape[1]] = ids * mask
    with torch.inference_mode():
        ours = encoder.model.encode_text(ids, mask)
        theirs = reference.encode_text(padded)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode_texts(texts), F.normalize(theirs, dim=-1),
                               atol=1e-5, rtol=0)

    from safetensors.torch import load_file
    heads = load_file(str(out / "heads.safetensors"))
    torch.testing.assert_close(heads["classifier.weight"], checkpoint["classifier.weight"])

    # An earlier run's folder (format ours) is validated and copied: the same features.
    copied = tmp_path / "copied"
    llava_reid("import-retriever", "--from", "ours", str(out), "--out", str(copied), cfg={})
    again = RetrieverEncoder.from_pretrained(copied, "cpu")
    torch.testing.assert_close(again.encode_pixels(pixels), encoder.encode_pixels(pixels))
    proc = llava_reid("import-retriever", "--from", "ours", str(tmp_path / "tokenizer"),
                      "--out", str(tmp_path / "not"), cfg={}, check=False)
    assert proc.returncode != 0 and "not a retriever folder" in proc.stderr


def test_irra_checkpoint_that_does_not_match_names_the_keys(tmp_path, open_clip_model):
    import torch

    from tests.conftest import llava_reid

    _clip_layout_tokenizer(tmp_path / "tokenizer")
    model = _tiny_open_clip(open_clip_model, context=16, vocab=62, seed=0)
    state = {f"base_model.{k}": v for k, v in model.state_dict().items()}
    del state["base_model.ln_final.weight"]
    state["base_model.visual.extra_tower.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pth")
    cfg = {"retriever": {"image_height": 48, "image_width": 16}}
    proc = llava_reid("import-retriever", "--from", "irra", str(tmp_path / "bad.pth"),
                      "--tokenizer", str(tmp_path / "tokenizer"), "--out",
                      str(tmp_path / "out"), cfg=cfg, check=False)
    assert proc.returncode != 0
    assert "visual.extra_tower.weight" in proc.stderr
    assert not (tmp_path / "out").exists()

    # A wrong input size cannot hold the checkpoint's 6x2 grid: named, not guessed.
    del state["base_model.visual.extra_tower.weight"]
    state["base_model.ln_final.weight"] = model.ln_final.weight.detach()
    torch.save(state, tmp_path / "good.pth")
    proc = llava_reid("import-retriever", "--from", "irra", str(tmp_path / "good.pth"),
                      "--tokenizer", str(tmp_path / "tokenizer"), "--image-size", "64x16",
                      "--out", str(tmp_path / "out"), cfg={}, check=False)
    assert proc.returncode != 0 and "12 vision positions" in proc.stderr


# -- (b) the original's questioner adapter: every LoRA delta on its own module ----------------

ORIGINAL_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny LLaVA-OneVision folder (our factory's) and its network."""
    from llava_reid.questioner.factory import build_tiny_questioner

    folder = tmp_path_factory.mktemp("tiny_base")
    tiny = dict(small_config()["questioner"]["tiny"], layers=2)
    net, tokenizer = build_tiny_questioner(tiny, ["a person in a red coat"] * 20, seed=0)
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, net


def _original_adapter(folder: Path, net, rank: int = 4, alpha: int = 8, extra=None):
    """An adapter as the original saves it: LlavaQwenForCausalLM module names, full-name
    targets, the projector in full (modules_to_save), adapter_model.bin."""
    import json

    import torch

    torch.manual_seed(3)
    state, deltas = {}, {}
    layers = net.model.language_model.layers
    for i, layer in enumerate(layers):
        for target in ORIGINAL_TARGETS:
            module = layer.get_submodule(target)
            name = f"model.layers.{i}.{target}"
            a = torch.randn(rank, module.in_features) * 0.1
            b = torch.randn(module.out_features, rank) * 0.1
            state[f"base_model.model.{name}.lora_A.weight"] = a
            state[f"base_model.model.{name}.lora_B.weight"] = b
            deltas[f"model.language_model.layers.{i}.{target}"] = (a, b)
    projector = net.model.multi_modal_projector
    for index, linear in (("0", projector.linear_1), ("2", projector.linear_2)):
        state[f"base_model.model.model.mm_projector.{index}.weight"] = torch.randn_like(linear.weight)
        state[f"base_model.model.model.mm_projector.{index}.bias"] = torch.randn_like(linear.bias)
    state.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": "/public/models/llava-onevision-qwen2-7b-ov",
        "target_modules": sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0]
                                  for k in state if ".lora_" in k}),
        "modules_to_save": ["model.mm_projector"],
    }))
    return state, deltas


def test_original_adapter_lands_every_delta_on_its_module(tmp_path, tiny_base):
    import torch
    from peft import PeftModel

    from tests.conftest import llava_reid

    folder, net = tiny_base
    state, deltas = _original_adapter(tmp_path / "original", net)
    out = tmp_path / "adapter"
    llava_reid("import-questioner", "--from", "llava-reid", str(tmp_path / "original"),
               "--model", str(folder), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
               cfg={"questioner": {"train_projector": True}})
    summary = yaml.safe_load((tmp_path / "m.json").read_text())
    assert summary["lora_modules"] == len(deltas) == 2 * len(ORIGINAL_TARGETS)
    assert summary["projector"] is True

    from transformers import LlavaOnevisionForConditionalGeneration
    base = LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    scaling = 8 / 4
    torch.manual_seed(4)
    for name, (a, b) in deltas.items():
        module = adapted.base_model.model.get_submodule(name)
        probe = torch.randn(3, a.shape[1])
        with torch.no_grad():
            delta = module(probe) - module.base_layer(probe)
        torch.testing.assert_close(delta, scaling * probe @ a.t() @ b.t(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # The projector trained in full replaces the base one.
    projector = adapted.base_model.model.model.multi_modal_projector
    x = torch.randn(2, projector.linear_1.in_features)
    w1, b1 = (state[f"base_model.model.model.mm_projector.0.{p}"] for p in ("weight", "bias"))
    w2, b2 = (state[f"base_model.model.model.mm_projector.2.{p}"] for p in ("weight", "bias"))
    with torch.no_grad():
        expected = torch.nn.functional.gelu(x @ w1.t() + b1) @ w2.t() + b2
        torch.testing.assert_close(projector(x), expected, atol=1e-5, rtol=1e-4)


def test_original_adapter_with_an_unmappable_key_stops_naming_it(tmp_path, tiny_base):
    import torch

    from tests.conftest import llava_reid

    folder, net = tiny_base
    cases = {
        # No counterpart in LLaVA-OneVision at all.
        "base_model.model.model.vision_resampler.pool.lora_A.weight": torch.zeros(4, 8),
        # Maps by name, but our base has no such layer.
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
    }
    for i, (key, value) in enumerate(cases.items()):
        source = tmp_path / f"original{i}"
        _original_adapter(source, net, extra={key: value})
        out = tmp_path / f"adapter{i}"
        proc = llava_reid("import-questioner", "--from", "llava-reid", str(source), "--model",
                          str(folder), "--out", str(out),
                          cfg={"questioner": {"train_projector": True}}, check=False)
        assert proc.returncode != 0 and key in proc.stderr, proc.stderr[-2000:]
        assert not out.exists()
    # A trained projector needs train_projector, or evaluation would use the base projector.
    _original_adapter(tmp_path / "clean", net)
    proc = llava_reid("import-questioner", "--from", "llava-reid", str(tmp_path / "clean"),
                      "--out", str(tmp_path / "adapter"),
                      cfg={"questioner": {"train_projector": False}}, check=False)
    assert proc.returncode != 0 and "train_projector" in proc.stderr


def test_original_selector_scores_as_ours(tmp_path):
    """The original's selector.pth -> ours: the same log-probabilities over the valid pool."""
    import math

    import torch
    from torch import nn

    from llava_reid.selector.model import Selector
    from tests.conftest import llava_reid

    class OriginalLayout(nn.Module):
        """The original's module names and sequence-first layout."""

        def __init__(self, dim=32, heads=4, layers=2, ffn=64):
            super().__init__()
            self.modality_embed = nn.Embedding(2, dim)
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(dim, heads, ffn, activation="gelu"), layers,
                enable_nested_tensor=False)
            self.selector = nn.Linear(dim, 1, bias=False)

        def forward(self, text, images, valid):
            scale = math.sqrt(text.shape[1])
            text = text * scale + self.modality_embed.weight[0]
            images = images * scale + self.modality_embed.weight[1]
            x = torch.cat([text[:, None], images], dim=1).transpose(0, 1)
            pad = torch.cat([torch.zeros(len(valid), 1, dtype=torch.bool), ~valid], dim=1)
            x = self.encoder(x, src_key_padding_mask=pad)[1:].transpose(0, 1)
            logits = self.selector(x).squeeze(-1).masked_fill(~valid, -1e4)
            return torch.log_softmax(logits, dim=1)

    torch.manual_seed(5)
    original = OriginalLayout().eval()
    torch.save(original.state_dict(), tmp_path / "selector.pth")
    out = tmp_path / "selector.safetensors"
    llava_reid("import-selector", "--from", "llava-reid", str(tmp_path), "--out", str(out),
               cfg={"selector": {"heads": 4, "dropout": 0.1}})
    ours = Selector.load(out)
    assert ours.config == {"dim": 32, "layers": 2, "heads": 4, "ffn": 64, "dropout": 0.1,
                           "retrieval_prior": False}
    text = nn.functional.normalize(torch.randn(3, 32), dim=-1)
    pool = nn.functional.normalize(torch.randn(3, 9, 32), dim=-1)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 6:] = False
    valid[2, 4:] = False
    with torch.no_grad():
        expected, got = original(text, pool, valid), ours(text, pool, valid)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-4)

    # Format ours: an earlier run's joint/ (selector.safetensors with adapter/ beside it).
    import json

    from safetensors.torch import save_file
    joint = tmp_path / "joint"
    (joint / "adapter").mkdir(parents=True)
    ours.save(joint / "selector.safetensors")
    save_file({"base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight":
               torch.ones(2, 8)}, str(joint / "adapter" / "adapter_model.safetensors"))
    (joint / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    llava_reid("import-selector", "--from", "ours", str(joint / "selector.safetensors"),
               "--out", str(tmp_path / "run/selector.safetensors"),
               "--out-adapter", str(tmp_path / "run/adapter"), cfg={})
    assert Selector.load(tmp_path / "run/selector.safetensors").config == ours.config
    assert (tmp_path / "run/adapter/adapter_model.safetensors").read_bytes() == (
        joint / "adapter" / "adapter_model.safetensors").read_bytes()
    # Nothing beside it and no --adapter: no joint adapter to write.
    proc = llava_reid("import-selector", "--from", "llava-reid", str(tmp_path / "selector.pth"),
                      "--out", str(tmp_path / "x.safetensors"), "--out-adapter",
                      str(tmp_path / "x"), cfg={"selector": {"heads": 4, "dropout": 0.1}},
                      check=False)
    assert proc.returncode != 0 and "no adapter beside" in proc.stderr

    state = original.state_dict()
    state["sampler.k"] = torch.tensor(3)
    torch.save(state, tmp_path / "selector.pth")
    proc = llava_reid("import-selector", "--from", "llava-reid", str(tmp_path / "selector.pth"),
                      "--out", str(tmp_path / "bad.safetensors"), cfg={}, check=False)
    assert proc.returncode != 0 and "sampler.k" in proc.stderr


# -- (c) import-only run: a trained run's models, exported to the published formats ------------

def export_irra(folder: Path, path: Path) -> None:
    """Our retriever folder -> an IRRA checkpoint.pth (OpenAI layout under ``base_model.``,
    wrapped in ``{"model": ...}``), with the position grid at the folder's input size."""
    import json

    import torch

    from llava_reid.retriever import irra_layout as L
    from llava_reid.retriever.model import load_clip

    clip = load_clip(folder).eval()
    settings = json.loads((folder / "retriever.json").read_text())
    ours = clip.state_dict()
    single = {v: k for k, v in L.SINGLE.items()}
    block = {v: k for k, v in L.BLOCK.items()}
    out = {}
    for key, value in ours.items():
        if key in single:
            out[single[key]] = value
        elif key in {v: k for k, v in L.TRANSPOSED.items()}:
            out[{v: k for k, v in L.TRANSPOSED.items()}[key]] = value.t()
    for theirs, tower in L.TOWERS.items():
        config = clip.config.vision_config if tower.startswith("vision") else clip.config.text_config
        for i in range(config.num_hidden_layers):
            prefix = f"{tower}{i}."
            for kind in ("weight", "bias"):
                out[f"{theirs}{i}.attn.in_proj_{kind}"] = torch.cat(
                    [ours[f"{prefix}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for name, value in ours.items():
                rest = name[len(prefix):]
                if name.startswith(prefix) and rest in block:
                    out[f"{theirs}{i}.{block[rest]}"] = value
    embeddings = clip.vision_model.embeddings
    height, width = settings["image_height"], settings["image_width"]
    patches = (height // embeddings.patch_size) * (width // embeddings.patch_size)
    with torch.no_grad():
        out["visual.positional_embedding"] = embeddings.interpolate_pos_encoding(
            torch.zeros(1, patches + 1, embeddings.embed_dim), height, width)[0]
    torch.save({"model": {f"base_model.{k}": v.contiguous() for k, v in out.items()}}, path)


def export_original_adapter(folder: Path, target: Path) -> None:
    """Our adapter folder -> the original's layout (LlavaQwenForCausalLM names, full-name
    targets and modules_to_save, adapter_model.bin)."""
    import json

    import torch
    from safetensors.torch import load_file

    from llava_reid.questioner import original_layout as L

    inverse = [(new, old) for old, new in L.MODULE_MAP]

    def original(name: str) -> str:
        dotted = name + "."
        for new, old in inverse:
            if dotted.startswith(new):
                return (old + dotted[len(new):])[:-1]
        raise AssertionError(f"no original name for {name}")

    state = load_file(str(folder / "adapter_model.safetensors"))
    exported = {L.PEFT_PREFIX + original(k[len(L.PEFT_PREFIX):]): v for k, v in state.items()}
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = [original(m) for m in L.lora_modules(state)]
    config["modules_to_save"] = sorted({original(k[len(L.PEFT_PREFIX):].rsplit(".", 1)[0])
                                        for k in state if not L.LORA_TENSOR.search(k)}) or None
    config["task_type"] = "CAUSAL_LM"
    target.mkdir(parents=True, exist_ok=True)
    torch.save(exported, target / "adapter_model.bin")
    (target / "adapter_config.json").write_text(json.dumps(config))


def export_original_selector(path: Path, target: Path) -> None:
    import torch

    from llava_reid.selector.model import Selector

    renamed = {"modality.weight": "modality_embed.weight", "head.weight": "selector.weight"}
    state = Selector.load(path).state_dict()
    torch.save({renamed.get(k, k): v for k, v in state.items()}, target)


METHODS_C = ["initial", "questioner", "selector"]


@pytest.mark.workflow
def test_import_only_run_reproduces_the_trained_runs_metrics(trained_run, tmp_path):
    """The session's shared small trained run (read-only), exported; the import-only run is
    built in a working directory of its own."""
    import json

    cfg = trained_run["cfg"]
    trained = trained_run["run"]
    # IRRA's format stores no head count (OpenAI's CLIP: width / 64): the tiny CLIP follows it.
    assert cfg["retriever"]["tiny"]["hidden_size"] == 64 * cfg["retriever"]["tiny"]["heads"]
    # Nor has the original's selector a retrieval prior (its selector.pth cannot hold one).
    assert cfg["selector"]["retrieval_prior"] is False
    assert set(METHODS_C) <= set(cfg["evaluate"]["methods"])

    published = tmp_path / "published"
    published.mkdir()
    export_irra(trained / "retriever/model", published / "checkpoint.pth")
    export_original_adapter(trained / "questioner/adapter", published / "questioner")
    # The original's joint checkpoint folder: its adapter and selector.pth side by side.
    export_original_adapter(trained / "joint/adapter", published / "joint")
    export_original_selector(trained / "joint/selector.safetensors",
                             published / "joint" / "selector.pth")

    imported_cfg = json.loads(json.dumps(cfg))
    imported_cfg["run"] = "imported"
    imported_cfg["evaluate"]["methods"] = METHODS_C
    imported_cfg["questioner"]["pretrained"] = str(trained / "models/questioner_tiny")
    imported_cfg["retriever"]["checkpoint"] = {
        "format": "irra", "path": str(published / "checkpoint.pth"),
        "tokenizer": str(trained / "retriever/model")}
    imported_cfg["questioner"]["checkpoint"] = {"format": "llava-reid",
                                                "path": str(published / "questioner")}
    imported_cfg["selector"]["checkpoint"] = {"format": "llava-reid",
                                              "path": str(published / "joint")}
    proc = snakemake(tmp_path, configfiles=[write_config(tmp_path / "imported.yaml", imported_cfg)])
    ran = set(re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, flags=re.M))
    assert {"import_retriever", "import_questioner", "import_selector"} <= ran
    assert not ran & TRAINING_RULES, ran
    imported = tmp_path / cfg["results"] / "imported"

    def read(run: Path, rel: str):
        figures = json.loads((run / rel).read_text())
        figures.pop("seconds", None)  # wall time
        return figures

    assert read(imported, "retriever/metrics.json")["test"] == read(trained, "retriever/metrics.json")["test"]
    for method in METHODS_C:
        assert read(imported, f"eval/{method}/metrics.json") == read(
            trained, f"eval/{method}/metrics.json"), method
