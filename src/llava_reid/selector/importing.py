"""``import-selector``: a published selector -> this workflow's selector file.

- ``llava-reid``: the original's ``selector.pth`` (a plain state_dict). Its transformer is ours
  (post-norm encoder layers, GELU, no position embedding, no retrieval prior), so the encoder
  keys carry over unchanged; ``modality_embed`` -> ``modality`` and ``selector`` -> ``head``.
  Sizes come from the tensors; the head count, which tensors cannot tell, from
  ``selector.heads`` (without a ``selector`` section: the original's 8).
- ``ours``: an earlier run's selector ``.safetensors``, loaded to validate, then copied.

In the DAG this stands in for joint training, so it also writes ``joint/adapter``: the
questioner adapter published beside the selector (the original's joint checkpoint folder holds
both; an earlier run's ``joint/`` holds ``adapter/`` beside ``selector.safetensors``), else a
copy of ``--adapter`` (this run's questioner adapter).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from llava_reid.artifacts import atomic_dir, atomic_path, write_json
from llava_reid.config import ConfigError
from llava_reid.questioner.importing import import_adapter
from llava_reid.questioner.original_layout import CONFIG_FILE
from llava_reid.retriever.irra_layout import read_state_dict
from llava_reid.selector.model import FILE_NAME, Selector

log = logging.getLogger(__name__)

ORIGINAL_FILE = "selector.pth"
# The original's selector was built with 8 heads and dropout 0.1, which its tensors cannot
# tell: a hand-run import given no ``selector`` section converts with these.
ORIGINAL_ARCHITECTURE = {"heads": 8, "dropout": 0.1}
RENAMED = {"modality_embed.weight": "modality.weight", "selector.weight": "head.weight"}
ENCODER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")


def convert_original(path: str | Path, heads: int, dropout: float) -> Selector:
    """Our Selector holding the original's weights (raises naming missing/unexpected keys)."""
    path = Path(path)
    if path.is_dir():
        path = path / ORIGINAL_FILE
    state = read_state_dict(path)
    mapped, unexpected = {}, []
    for key, value in state.items():
        if key in RENAMED:
            mapped[RENAMED[key]] = value
        elif ENCODER_KEY.match(key):
            mapped[key] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{path}: unexpected keys {sorted(unexpected)[:20]}")
    if "modality.weight" not in mapped or "encoder.layers.0.linear1.weight" not in mapped:
        raise ValueError(f"{path}: missing keys (modality_embed.weight, encoder.layers.0.*): "
                         "not a selector state_dict")
    dim = mapped["modality.weight"].shape[1]
    layers = len({int(ENCODER_KEY.match(k).group(1)) for k in mapped if ENCODER_KEY.match(k)})
    ffn = mapped["encoder.layers.0.linear1.weight"].shape[0]
    selector = Selector(dim, layers=layers, heads=heads, ffn=ffn, dropout=dropout)
    expected = selector.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ValueError(f"{path}: missing keys {missing[:20]}")
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in mapped.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{path}: shapes do not match: {wrong[:10]}")
    selector.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
    return selector.eval()


def _retriever_dim(folder: str | Path) -> int:
    config = json.loads((Path(folder) / "config.json").read_text())
    return int(config["projection_dim"])


def published_adapter(source: str, path: str | Path) -> Path | None:
    """The questioner adapter published beside the selector, if any."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if source == "ours":
        folder = folder / "adapter"
    return folder if (folder / CONFIG_FILE).exists() else None


def run(cfg: dict[str, Any], source: str, path: str, out: str, retriever: str | None = None,
        adapter: str | None = None, out_adapter: str | None = None, model: str | None = None,
        metrics: str | None = None) -> None:
    # The rule passes selector.heads and selector.dropout (validated); a section given by hand
    # must hold both, like the rule's.
    selector_cfg = cfg.get("selector", ORIGINAL_ARCHITECTURE)
    missing = [f"selector.{k}" for k in ORIGINAL_ARCHITECTURE if k not in selector_cfg]
    if source == "llava-reid" and missing:
        raise ConfigError(f"import-selector: --config lacks {' and '.join(missing)} (give both, "
                          "or no selector section for the original's 8 heads, dropout 0.1)")
    if source == "llava-reid":
        selector = convert_original(path, selector_cfg["heads"], selector_cfg["dropout"])
    elif source == "ours":
        selector = Selector.load(path)
    else:
        raise ValueError(f"import-selector: unknown format {source!r} (llava-reid or ours)")
    dim = selector.config["dim"]
    if retriever and _retriever_dim(retriever) != dim:
        raise ValueError(f"{path}: selector features are {dim}-d, the retriever's "
                         f"{_retriever_dim(retriever)}-d ({retriever})")
    beside = published_adapter(source, path) if out_adapter else None
    if out_adapter and not (beside or adapter):
        raise ValueError(f"import-selector: no adapter beside {path} and no --adapter")
    if source == "ours":
        with atomic_path(out, suffix=".safetensors") as tmp:
            src = Path(path)
            shutil.copyfile(src if src.suffix == ".safetensors" else src / FILE_NAME, tmp)
    else:
        selector.save(out, extra={"imported": {"format": source, "path": str(path)}})
    if beside:
        train_projector = cfg.get("questioner", {}).get("train_projector")
        import_adapter(source, beside, out_adapter, model, train_projector)
    elif out_adapter:
        with atomic_dir(out_adapter) as tmp:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
    summary = {"imported": {"format": source, "path": str(path)}, "selector": selector.config,
               "adapter": str(beside or adapter) if out_adapter else None}
    log.info("imported selector %s: %s; joint adapter from %s", path, selector.config,
             summary["adapter"])
    if metrics:
        write_json(summary, metrics)
