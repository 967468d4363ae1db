"""Training curves of every training stage, from the ``history`` its metrics.json keeps.

One figure, one panel per curve:

- retriever: each loss term per epoch (its history's ``loss`` dict), and the validation R@1 of
  fine-grained (``f-R1``) and initial-description (``i-R1``) queries per epoch, the kept epoch
  marked;
- questioner (LoRA SFT): the loss of every step, with a moving average and epoch boundaries,
  and the held-out loss after training when recorded;
- selector warm-up (when given): loss per epoch and held-out agreement with the plain top-k;
- joint training (when given): the loss of every step, with a moving average, and the
  Gumbel-softmax temperature.

Deterministic like ``plots``: fixed size and dpi, matplotlib's default style, no metadata.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from llava_reid.report.plots import DPI, MetricsError, save_figure

log = logging.getLogger(__name__)

PANEL_SIZE = (5.0, 3.6)
COLUMNS = 3
SMOOTH_WINDOW = 20
VAL_KEYS = (("f-R1", "fine-grained query"), ("i-R1", "initial description"))


def _history(path: str, fields: tuple[str, ...]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A metrics.json and its history; every record must carry ``fields``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MetricsError(f"{path}: cannot read metrics ({exc})") from exc
    history = data.get("history")
    if not isinstance(history, list) or not history:
        raise MetricsError(f"{path}: key 'history' missing or empty")
    for i, record in enumerate(history):
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise MetricsError(f"{path}: history[{i}] lacks {missing}")
    return data, history


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total, kept = [], 0.0, []
    for v in values:
        kept.append(v)
        total += v
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def _steps(history: list[dict[str, Any]]) -> tuple[list[int], list[float], list[int]]:
    """Global step, loss, and the global steps where a new epoch starts."""
    xs, ys, boundaries = [], [], []
    for i, record in enumerate(history, start=1):
        if i > 1 and record["epoch"] != history[i - 2]["epoch"]:
            boundaries.append(i)
        xs.append(i)
        ys.append(float(record["loss"]))
    return xs, ys, boundaries


def _step_loss(ax: Any, history: list[dict[str, Any]], title: str) -> None:
    xs, ys, boundaries = _steps(history)
    window = min(SMOOTH_WINDOW, len(ys) // 5)
    if window < 2:  # too few steps to smooth
        ax.plot(xs, ys, color="tab:blue", linewidth=1.5, marker="o", markersize=3,
                label="step loss")
    else:
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=0.8, label="step loss")
        ax.plot(xs, _moving_average(ys, window), color="tab:blue", linewidth=1.8,
                label=f"mean of last {window} steps")
    for b in boundaries:
        ax.axvline(b - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("step" + (" (dotted: new epoch)" if boundaries else ""))
    ax.set_ylabel("loss")


def retriever_loss(ax: Any, history: list[dict[str, Any]]) -> None:
    epochs = [r["epoch"] for r in history]
    terms = sorted({k for r in history for k in (r["loss"] if isinstance(r["loss"], dict)
                                                    else {"loss": 0})})
    values = []
    for term in terms:
        ys = [_loss_term(r["loss"], term) for r in history]
        values += [v for v in ys if math.isfinite(v) and v > 0]
        ax.plot(epochs, ys, marker="o", markersize=4, label=term)
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")  # terms of different magnitude (e.g. SDM vs ID)
    ax.set_title("Retriever: training loss per term")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean loss")
    ax.legend(fontsize=8)


def _loss_term(loss: Any, term: str) -> float:
    value = loss.get(term) if isinstance(loss, dict) else loss
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def retriever_validation(ax: Any, data: dict[str, Any], history: list[dict[str, Any]]) -> None:
    epochs = [r["epoch"] for r in history]
    for key, name in VAL_KEYS:
        ys = [float(r["val"].get(key, math.nan)) for r in history]
        ax.plot(epochs, ys, marker="o", markersize=4, label=f"{key} ({name})")
    best = data.get("best_epoch")
    if best is not None:
        ax.axvline(best, color="green", linestyle="--", linewidth=1,
                   label=f"kept epoch {best} (best {data.get('select_metric', '')})")
    ax.set_title("Retriever: validation R@1 per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("R@1 (%)")
    ax.legend(fontsize=8)


def questioner_loss(ax: Any, data: dict[str, Any], history: list[dict[str, Any]]) -> None:
    _step_loss(ax, history, "Questioner (LoRA SFT): training loss")
    held = data.get("heldout_loss")
    if isinstance(held, (int, float)) and math.isfinite(held):
        ax.axhline(held, color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"held-out loss after training ({held:.3f})")
    ax.legend(fontsize=8)


def warmup_curves(ax: Any, history: list[dict[str, Any]]) -> None:
    trained = [r for r in history if r["loss"] is not None]
    ax.plot([r["epoch"] for r in trained], [float(r["loss"]) for r in trained], marker="o",
            markersize=4, color="tab:blue", label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    twin = ax.twinx()
    twin.plot([r["epoch"] for r in history], [100 * float(r["heldout_agreement"])
                                              for r in history],
              marker="s", markersize=4, color="tab:orange", label="held-out agreement")
    twin.set_ylabel("held-out agreement with plain top-k (%)", color="tab:orange")
    twin.set_ylim(0, 105)
    ax.set_title("Selector warm-up (epoch 0: untrained)")


def joint_curves(ax: Any, history: list[dict[str, Any]]) -> None:
    _step_loss(ax, history, "Joint training: questioner + selector loss")
    ax.legend(fontsize=8, loc="upper left")
    if all("tau" in r for r in history):
        twin = ax.twinx()
        twin.plot(range(1, len(history) + 1), [float(r["tau"]) for r in history],
                  color="tab:green", linewidth=1, label="temperature")
        twin.set_ylabel("Gumbel-softmax temperature", color="tab:green")


def run(cfg: dict[str, Any], out: str, retriever: str | None = None,
        questioner: str | None = None, warmup: str | None = None,
        joint: str | None = None) -> None:
    """Draw the training curves of the given stages' metrics.json into the PNG ``out`` (a
    stage imported instead of trained is not given)."""
    import matplotlib.style
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not any((retriever, questioner, warmup, joint)):
        raise MetricsError("training-curves: no training stage's metrics given")
    panels = []
    r_hist = q_hist = []
    if retriever:
        r_data, r_hist = _history(retriever, ("epoch", "loss", "val"))
        panels += [lambda ax: retriever_loss(ax, r_hist),
                   lambda ax: retriever_validation(ax, r_data, r_hist)]
    if questioner:
        q_data, q_hist = _history(questioner, ("epoch", "loss"))
        panels.append(lambda ax: questioner_loss(ax, q_data, q_hist))
    if warmup:
        _, w_hist = _history(warmup, ("epoch", "loss", "heldout_agreement"))
        panels.append(lambda ax: warmup_curves(ax, w_hist))
    if joint:
        _, j_hist = _history(joint, ("epoch", "loss"))
        panels.append(lambda ax: joint_curves(ax, j_hist))

    rows = math.ceil(len(panels) / COLUMNS)
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(PANEL_SIZE[0] * COLUMNS, PANEL_SIZE[1] * rows), dpi=DPI)
        axes = fig.subplots(rows, COLUMNS, squeeze=False).ravel()
        for ax, draw in zip(axes, panels, strict=False):
            draw(ax)
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        fig.tight_layout()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, Path(out))
    log.info("drew %d training-curve panels (retriever %d epochs, questioner %d steps) to %s",
             len(panels), len(r_hist), len(q_hist), out)
