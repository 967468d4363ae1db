"""Published weights as DAG inputs: `<section>.checkpoint` schedules an import in place of
training; IRRA's retriever and the original's questioner adapter and selector convert exactly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, small_config

TRAINING_RULES = {"init_retriever", "train_retriever", "prepare_data", "train_questioner",
                  "warmup_selector", "train_joint"}


def _dry_run(work: Path, cfg: dict, *extra: str) -> subprocess.CompletedProcess:
    cfg_file = work / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(work), "--cores", "1", "--dry-run", "--configfile", str(cfg_file),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _planned_rules(proc: subprocess.CompletedProcess) -> set[str]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return set(re.findall(r"^(?:local)?rule (\w+):", proc.stdout, flags=re.M))


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
    rules = _planned_rules(_dry_run(tmp_path, cfg))
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
    rules = _planned_rules(_dry_run(tmp_path, cfg))
    assert "import_retriever" in rules
    assert not rules & {"init_retriever", "train_retriever"}, rules
    assert {"prepare_data", "train_questioner", "warmup_selector", "train_joint"} <= rules


def test_questioner_checkpoint_without_selector_trains_the_joint_stage_from_it(tmp_path):
    paths = _fake_checkpoints(tmp_path)
    cfg = small_config()
    cfg["questioner"]["checkpoint"] = {"format": "ours", "path": str(paths["questioner"])}
    rules = _planned_rules(_dry_run(tmp_path, cfg))
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
                      "--tokenizer", str(tmp_path / "tokenizer"), "--out",
                      str(tmp_path / "out"), cfg={"retriever": {"image_height": 64,
                                                                 "image_width": 16}}, check=False)
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
