"""train-retriever: IRRA-style training (SDM + ID + MLM) of the CLIP dual encoder.

- accelerate for devices and precision: bf16 on GPU, fp32 on CPU, DDP when launched on
  several processes (``torchrun``/``accelerate launch``);
- image <-> fine-grained description pairs of the training split, augmentation as IRRA;
- a checkpoint after every epoch (model, heads, optimizer, schedule, best-so-far); a rerun with
  the same config resumes from it, a changed config starts over;
- the kept epoch is chosen on the VALIDATION split (test stays unseen until the end);
- every random draw derives from (seed, epoch, step/sample), so a resumed run equals an
  uninterrupted one.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from llava_reid.artifacts import atomic_dir, write_json
from llava_reid.data.annotations import read_annotations
from llava_reid.data.folds import identity_folds, parse_fold
from llava_reid.data.transforms import RetrieverTransform, load_pixels
from llava_reid.metrics import rank_metrics
from llava_reid.retriever.encoder import RetrieverEncoder, retriever_settings, write_settings
from llava_reid.retriever.losses import id_loss, mask_tokens, mlm_loss, sdm_loss
from llava_reid.retriever.model import QueryTokenizer, Retriever, load_clip, load_tokenizer
from llava_reid.runtime import config_hash
from llava_reid.stage_views import config_key, typed_view
from llava_reid.training import (
    BatchPlan,
    ResumableCheckpoint,
    TrainingLoop,
    derived_seed,
    inputs_fingerprint,
    make_accelerator,
    restore_file,
    warmup_cosine,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrieverRecipe:
    """What train-retriever reads of the ``retriever`` section."""

    image_height: int
    image_width: int
    text_length: int
    image_pooling: str
    augment: bool
    text_views: Mapping[str, float]  # share of steps that see each shorter query view
    losses: Mapping[str, float]  # weights of sdm, id and mlm; 0 = off
    mlm_layers: int
    mlm_mask_prob: float
    temperature: float
    batch_size: int  # global, split over processes
    epochs: int
    warmup_epochs: int
    lr: float
    weight_decay: float
    lr_factor: float  # on the new heads' learning rate
    bias_lr_factor: float
    eval_batch_size: int
    select_metric: str  # the validation metric that picks the kept epoch


@dataclass(frozen=True)
class RetrieverTrainingConfig:
    """Every setting train-retriever reads, built once from its validated config view."""

    seed: int
    device: str
    recipe: RetrieverRecipe = config_key("retriever")
    # The section as passed: the checkpoints' tag, and the settings saved with the model.
    retriever: Mapping[str, Any]


# Decoded, resized training images are kept in memory up to this many bytes (the embedded
# default's set is ~12 MB); larger sets are read from disk every epoch.
IMAGE_CACHE_BYTES = 2 << 30


class PairDataset(Dataset):
    """Training pairs: (augmented image, fine-grained description, class id, pid)."""

    def __init__(self, rows: pd.DataFrame, image_root: Path, transform, seed: int,
                 text_views: dict[str, float] | None = None):
        self.rows = rows.reset_index(drop=True)
        self.text_views = text_views or {"initial": 0.0, "partial": 0.0}
        self.image_root = image_root
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        per_image = 3 * transform.height * transform.width
        self._cache: dict[int, Image.Image] | None = (
            {} if per_image * len(self.rows) <= IMAGE_CACHE_BYTES else None
        )

    def _image(self, i: int) -> Image.Image:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        with Image.open(self.image_root / self.rows.file_path.iloc[i]) as img:
            resized = self.transform.resize(img)
        if self._cache is not None:
            self._cache[i] = resized
        return resized

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows.iloc[i]
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, i))
        pixels = self.transform(self._image(i), g)
        text = sample_text_view(row.fine_grained_description, row.initial_description,
                                self.text_views, g)
        return pixels, text, int(row.class_id), int(row.pid)


_SENTENCES = re.compile(r"[^.!?]+[.!?]+")


def sample_text_view(fine: str, initial: str, views: dict[str, float],
                     g: torch.Generator) -> str:
    """The text paired with an image: the fine-grained description, or with probability
    ``views["initial"]`` the initial description, or with probability ``views["partial"]`` a
    random ordered subset of the fine-grained description's sentences. Dialogue queries are
    partial descriptions, so the text tower learns to rank from partial ones too."""
    u = float(torch.rand((), generator=g))
    if u < views["initial"]:
        return initial
    if u < views["initial"] + views["partial"]:
        sentences = _SENTENCES.findall(fine) or [fine]
        keep = torch.rand(len(sentences), generator=g) < 0.5
        if not bool(keep.any()):
            keep[int(torch.randint(len(sentences), (), generator=g))] = True
        return " ".join(s.strip() for s, k in zip(sentences, keep.tolist(), strict=True) if k)
    return fine


def _collate(batch):
    pixels, texts, class_ids, pids = zip(*batch, strict=True)
    return torch.stack(pixels), list(texts), torch.tensor(class_ids), torch.tensor(pids)


def _param_groups(model: Retriever, recipe: RetrieverRecipe) -> list[dict[str, Any]]:
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd = recipe.lr, recipe.weight_decay
        if name.startswith(("classifier", "cross_former")):
            lr *= recipe.lr_factor
        if name.endswith("bias"):
            lr, wd = lr * recipe.bias_lr_factor, 0.0
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


class SplitEvaluation:
    """A split's gallery images, decoded and preprocessed once, and its two query texts per
    image. Scored after every epoch, so only the encoders run each time (decoding and resizing
    the images is the slow part)."""

    QUERIES = (("f", "fine_grained_description"), ("i", "initial_description"))

    def __init__(self, rows: pd.DataFrame, image_root: Path, transform: RetrieverTransform):
        self.pixels = load_pixels((image_root / p for p in rows.file_path), transform)
        self.pids = torch.tensor(rows.pid.to_numpy())
        self.texts = {prefix: list(rows[column]) for prefix, column in self.QUERIES}

    def __call__(self, encoder: RetrieverEncoder, bs: int) -> dict[str, float]:
        """f-* (fine-grained queries) and i-* (initial-description queries) metrics."""
        gallery = torch.cat([encoder.encode_pixels(self.pixels[s : s + bs])
                             for s in range(0, len(self.pixels), bs)])
        out = {}
        for prefix, texts in self.texts.items():
            queries = encoder.encode_texts(texts, bs)
            metrics = rank_metrics(queries @ gallery.t(), self.pids, self.pids)
            out.update({f"{prefix}-{k}": round(float(v), 3) for k, v in metrics.items()})
        return out


def evaluate_split(encoder: RetrieverEncoder, rows: pd.DataFrame, image_root: Path, bs: int):
    """f-* and i-* metrics of a split (see SplitEvaluation)."""
    return SplitEvaluation(rows, image_root, encoder.transform)(encoder, bs)


class Checkpoints(ResumableCheckpoint):
    """``last/`` (resume point: weights with heads, optimizer, schedule) and ``best/`` (the
    kept epoch, in the ``save_pretrained`` layout) under one folder."""

    @property
    def best(self) -> Path:
        return self.folder / "best"

    @staticmethod
    def weights(model: Retriever) -> Callable[[Path], None]:
        def save(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(tmp / "retriever.safetensors"))

        return save

    def save_best(self, model: Retriever, tokenizer, rcfg: dict[str, Any]) -> None:
        with atomic_dir(self.best) as tmp:
            model.clip.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_settings(tmp, rcfg)

    def restore(self, model: Retriever) -> None:
        model.load_state_dict(restore_file(self.last / "retriever.safetensors", load_file))


def train_step(model, batch, tokenize, mask_cfg, weights, temperature, accelerator, g):
    pixels, texts, class_ids, pids = batch
    device = accelerator.device
    pixels, class_ids, pids = pixels.to(device), class_ids.to(device), pids.to(device)
    ids, attn = (t.to(device) for t in tokenize(texts))
    net = accelerator.unwrap_model(model)
    image_tokens = net.image_tokens(pixels)
    image_feats = net.pool_image(image_tokens)
    text_feats = net.encode_text(ids, attn)
    losses = {}
    if weights["sdm"] > 0:
        all_img, all_txt, all_pid = image_feats, text_feats, pids
        if accelerator.num_processes > 1:
            # Other ranks' features join the similarity matrix without gradient.
            gi, gt, gp = accelerator.gather((image_feats.detach(), text_feats.detach(), pids))
            n, r = len(pids), accelerator.process_index
            all_img = torch.cat([gi[: r * n], image_feats, gi[(r + 1) * n :]])
            all_txt = torch.cat([gt[: r * n], text_feats, gt[(r + 1) * n :]])
            all_pid = gp
        losses["sdm"] = sdm_loss(all_img, all_txt, all_pid, all_pid, temperature)
    if weights["id"] > 0:
        losses["id"] = id_loss(net.classifier, image_feats.float(), text_feats.float(), class_ids)
    if weights["mlm"] > 0:
        masked, labels = mask_tokens(ids, attn, **mask_cfg, g=g)
        logits = net.cross_former(net.text_tokens(masked, attn), image_tokens, attn == 0)
        losses["mlm"] = mlm_loss(logits.float(), labels)
    total = sum(weights[k] * v for k, v in losses.items())
    return total, {k: float(v.detach()) for k, v in losses.items()}


def run(
    cfg: dict[str, Any],
    annotations: str,
    image_root: str,
    init: str,
    out: str,
    metrics: str,
    checkpoints: str,
    fold: str | None = None,
) -> None:
    """``fold`` "k/N": train without the training identities of fold k of N (a cross-fitting
    retriever, llava_reid.data.folds); validation and test stay whole."""
    settings = typed_view(RetrieverTrainingConfig, cfg)
    recipe, seed = settings.recipe, settings.seed
    image_root = Path(image_root)
    accelerator = make_accelerator(settings.device, 1, seed)

    table = read_annotations(annotations)
    train_rows = table[table.split == "train"]
    val_rows = table[table.split == "val"]
    num_classes = int(train_rows.class_id.max()) + 1  # of the whole split: ids stay put
    held_out = parse_fold(fold)
    if held_out is not None:
        k, n = held_out
        train_rows = train_rows[identity_folds(train_rows.pid, n, seed) != k]
        log.info("fold %d/%d: training on %d images of %d identities", k, n, len(train_rows),
                 train_rows.pid.nunique())

    tokenizer = load_tokenizer(init)
    weights = recipe.losses
    model = Retriever(
        load_clip(init),
        num_classes=num_classes if weights["id"] > 0 else 0,
        mlm_layers=recipe.mlm_layers,
        temperature=recipe.temperature,
        with_mlm=weights["mlm"] > 0,
        image_pooling=recipe.image_pooling,
    )
    tokenize = QueryTokenizer(tokenizer, recipe.text_length)
    mask_cfg = {
        "mask_id": tokenizer.mask_token_id,
        "vocab_size": model.clip.config.text_config.vocab_size,
        "special_ids": sorted(set(tokenizer.all_special_ids)),
        "prob": recipe.mlm_mask_prob,
    }

    plan = BatchPlan.make(len(train_rows), recipe.batch_size, accelerator.num_processes,
                          accelerator.process_index, annotations, "training images")
    total_steps = plan.steps * recipe.epochs
    optimizer = torch.optim.Adam(_param_groups(model, recipe), betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, plan.steps * recipe.warmup_epochs, 0.1)
    )
    tag = {"retriever": settings.retriever, "seed": seed, "init": init,
           "inputs": inputs_fingerprint(annotations, image_root, init)}
    if fold is not None:
        tag["fold"] = fold
    ckpt = Checkpoints(checkpoints, config_hash(tag))
    state = ckpt.load_state()
    if state is not None:
        ckpt.restore(model)
    loop = TrainingLoop("train-retriever", accelerator, model, optimizer, scheduler, ckpt, state,
                        Checkpoints.weights(model), plan, epochs=recipe.epochs, seed=seed,
                        step_history=False, initial={"best": None})
    transform = RetrieverTransform(recipe.image_height, recipe.image_width, train=recipe.augment)
    dataset = PairDataset(train_rows, image_root, transform, seed, recipe.text_views)
    validation = SplitEvaluation(val_rows, image_root, RetrieverTransform(
        recipe.image_height, recipe.image_width, train=False))

    def step(module, indices: list[int], epoch: int, s: int):
        dataset.epoch = epoch
        g = torch.Generator().manual_seed(derived_seed(seed, epoch, s, plan.rank, 7))
        return train_step(module, _collate([dataset[i] for i in indices]), tokenize, mask_cfg,
                          weights, recipe.temperature, accelerator, g)

    def end_of_epoch(epoch: int, losses: dict[str, float], state: dict[str, Any],
                     started: float) -> str:
        """Validation picks the kept epoch (main process only)."""
        net = accelerator.unwrap_model(loop.module)
        net.eval()
        encoder = RetrieverEncoder(net, tokenizer, retriever_settings(settings.retriever),
                                   accelerator.device)
        val = validation(encoder, recipe.eval_batch_size)
        score = val[recipe.select_metric]
        if state["best"] is None or score > state["best"]["score"]:
            state["best"] = {"epoch": epoch, "score": score}
            ckpt.save_best(net, tokenizer, settings.retriever)
        state["history"].append({"epoch": epoch, "loss": losses, "seconds":
                                 round(time.time() - started, 1), "val": val})
        return (f"val {recipe.select_metric}={score:.2f} (best {state['best']['score']:.2f} "
                f"@ {state['best']['epoch']})")

    state = loop.run(step, end_of_epoch)

    def write_outputs() -> None:
        best = RetrieverEncoder.from_pretrained(ckpt.best, settings.device)
        test_rows = table[table.split == "test"]
        result = {
            "best_epoch": state["best"]["epoch"],
            "select_metric": recipe.select_metric,
            "val": validation(best, recipe.eval_batch_size),
            "test": evaluate_split(best, test_rows, image_root, recipe.eval_batch_size),
            "history": state["history"],
        }
        log.info("kept epoch %d; test %s", result["best_epoch"], result["test"])
        with atomic_dir(out) as tmp:
            shutil.copytree(ckpt.best, tmp, dirs_exist_ok=True)
        write_json(result, metrics)

    loop.finish(write_outputs)
