"""Figures and tables comparing the evaluated methods round by round.

Reads every method's ``eval/{method}/metrics.json`` and writes into one folder:

- ``recall_vs_round.png``: R@1, R@5 and R@10 against the dialogue round, one panel per metric,
  one line per method;
- ``bri.png``: the Best-Rank Improvement of each method (lower is better);
- ``metrics.tsv``: one row per method and round (R1, R5, R10, mAP, mINP in percent, and the
  method's BRI), values written exactly as read;
- ``metrics.html``: a small table for the Snakemake report: methods as rows, R@1 after every
  round and the final R@5/R@10/mAP/mINP and BRI as columns, the best value of each column bold.

Output is deterministic: fixed figure size and dpi, matplotlib's default style whatever the
user's matplotlibrc says, no software/date metadata in the PNG files, methods in the order given.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from llava_reid.artifacts import atomic_path

log = logging.getLogger(__name__)

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
RECALLS = (("R1", "R@1"), ("R5", "R@5"), ("R10", "R@10"))
DPI = 120
RECALL_FIGSIZE = (13.0, 4.6)
BRI_FIGSIZE_HEIGHT = 4.2
TSV_COLUMNS = ("method", "label", "round", *METRICS, "BRI", "queries")


class MetricsError(ValueError):
    """A metrics.json does not have the expected shape."""


def load_metrics(paths: list[str]) -> list[dict[str, Any]]:
    """Read and check the metrics files, keeping their order; rounds sorted ascending."""
    if not paths:
        raise MetricsError("no metrics files given")
    methods: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MetricsError(f"{path}: cannot read metrics ({exc})") from exc
        for key in ("method", "per_round"):
            if key not in data:
                raise MetricsError(f"{path}: key {key!r} missing")
        name = str(data["method"])
        if name in seen:
            raise MetricsError(f"{path}: method {name!r} given twice")
        seen.add(name)
        per_round = []
        for entry in data["per_round"]:
            missing = [k for k in ("round", *METRICS) if k not in entry]
            if missing:
                raise MetricsError(f"{path}: per_round entry lacks {missing}")
            per_round.append({"round": int(entry["round"]), **{k: entry[k] for k in METRICS}})
        if not per_round:
            raise MetricsError(f"{path}: per_round is empty")
        per_round.sort(key=lambda e: e["round"])
        methods.append(
            {
                "method": name,
                "label": str(data.get("label") or name),
                "queries": data.get("queries"),
                "rounds": int(data.get("rounds", per_round[-1]["round"])),
                "per_round": per_round,
                "BRI": data.get("BRI"),
                "seconds": data.get("seconds"),
            }
        )
        if data.get("with_auxiliary"):
            methods.append(_with_auxiliary(path, methods[-1], data["with_auxiliary"]))
    return methods


def _with_auxiliary(path: str, method: dict[str, Any], aux: dict[str, Any]) -> dict[str, Any]:
    """A method's rounds re-ranked with an external retriever's similarity fused in, shown as
    one more row/line beside the method itself."""
    per_round = []
    for entry in aux.get("per_round") or []:
        missing = [k for k in ("round", *METRICS) if k not in entry]
        if missing:
            raise MetricsError(f"{path}: with_auxiliary per_round entry lacks {missing}")
        per_round.append({"round": int(entry["round"]), **{k: entry[k] for k in METRICS}})
    if not per_round:
        raise MetricsError(f"{path}: with_auxiliary.per_round is empty")
    per_round.sort(key=lambda e: e["round"])
    return {**method, "method": f"{method['method']}+auxiliary",
            "label": f"{method['label']} + auxiliary (w={aux.get('weight')})",
            "per_round": per_round, "BRI": aux.get("BRI")}


def _number(value: Any) -> float:
    """A metric value as a float; None and non-numbers become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        # No "Software" entry: the bytes do not depend on the matplotlib version string.
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})


def plot_recall(methods: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.style
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    max_round = max(m["per_round"][-1]["round"] for m in methods)
    markers = "osD^vP*Xh<>"
    with matplotlib.style.context("default"):
        fig = Figure(figsize=RECALL_FIGSIZE, dpi=DPI)
        axes = fig.subplots(1, len(RECALLS), sharex=True)
        for ax, (key, name) in zip(axes, RECALLS, strict=True):
            for i, (m, color) in enumerate(zip(methods, _colors(len(methods)), strict=True)):
                rounds = [e["round"] for e in m["per_round"]]
                values = [_number(e[key]) for e in m["per_round"]]
                ax.plot(rounds, values, marker=markers[i % len(markers)], color=color,
                        linewidth=1.8, markersize=5, label=m["label"])
            ax.set_title(name)
            ax.set_xlabel("round (0 = initial description)")
            ax.set_ylabel(f"{name} (%)")
            ax.set_xlim(-0.25, max(max_round, 1) + 0.25)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.suptitle("Target retrieved in the top k after each round of dialogue")
        fig.legend(handles, labels, loc="lower center", ncol=min(len(methods), 5), frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 0.97))
        _save(fig, path)


def plot_bri(methods: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.style
    from matplotlib.figure import Figure

    values = [_number(m["BRI"]) for m in methods]
    finite = [v for v in values if math.isfinite(v)]
    best = min(finite) if finite else None
    width = max(5.0, 1.3 * len(methods) + 2.0)
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(width, BRI_FIGSIZE_HEIGHT), dpi=DPI)
        ax = fig.subplots()
        xs = list(range(len(methods)))
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(xs, heights, color=_colors(len(methods)), width=0.6)
        top = max([h for h in heights if h > 0], default=1.0)
        for bar, v in zip(bars, values, strict=True):
            text = f"{v:.3f}" if math.isfinite(v) else "n/a"
            is_best = best is not None and math.isfinite(v) and v == best
            if is_best:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02 * top, text,
                    ha="center", va="bottom", fontweight="bold" if is_best else "normal")
        ax.set_xticks(xs, [m["label"] for m in methods], rotation=15 if len(methods) > 4 else 0)
        ax.set_ylim(0, top * 1.18)
        ax.set_ylabel("BRI (mean log best rank per round)")
        ax.set_title("Best-Rank Improvement (lower is better)")
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        _save(fig, path)


def write_tsv(methods: list[dict[str, Any]], path: Path) -> None:
    """One row per method and round; numbers in Python's shortest exact form."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return repr(value)
        return str(value)

    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(TSV_COLUMNS)
    for m in methods:
        for entry in m["per_round"]:
            writer.writerow(
                [m["method"], m["label"], entry["round"], *(cell(entry[k]) for k in METRICS),
                 cell(m["BRI"]), cell(m["queries"])]
            )
    with atomic_path(path, suffix=".tsv") as tmp:
        tmp.write_text(buf.getvalue())


def _table_columns(methods: list[dict[str, Any]]) -> list[tuple[str, Any, bool, str]]:
    """(header, value getter, higher is better, format) for each column of the HTML table."""
    rounds = sorted({e["round"] for m in methods for e in m["per_round"]})
    finals = {m["per_round"][-1]["round"] for m in methods}
    final_name = f"after round {finals.pop()}" if len(finals) == 1 else "final"

    def at_round(key: str, r: int):
        def get(m):
            return next((e[key] for e in m["per_round"] if e["round"] == r), None)

        return get

    def final(key: str):
        return lambda m: m["per_round"][-1][key]

    cols: list[tuple[str, Any, bool, str]] = []
    for r in rounds:
        name = "R@1 initial" if r == 0 else f"R@1 after round {r}"
        cols.append((name, at_round("R1", r), True, ".1f"))
    for key, name in (("R5", "R@5"), ("R10", "R@10"), ("mAP", "mAP"), ("mINP", "mINP")):
        cols.append((f"{name} {final_name}", final(key), True, ".1f"))
    cols.append(("BRI (lower is better)", lambda m: m["BRI"], False, ".3f"))
    return cols


_CSS = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
th { background: #eee; }
td.method, th.method { text-align: left; }
caption { caption-side: bottom; text-align: left; padding-top: 6px; color: #555; }
""".strip()


def write_html(methods: list[dict[str, Any]], path: Path) -> None:
    cols = _table_columns(methods)
    best: list[float | None] = []
    for _, get, higher, _ in cols:
        vals = [v for v in (_number(get(m)) for m in methods) if math.isfinite(v)]
        best.append((max(vals) if higher else min(vals)) if vals else None)

    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8"><title>Interactive retrieval: metrics per method</title>',
        f"<style>\n{_CSS}\n</style></head>",
        "<body>",
        "<table>",
        "<caption>Percentages over all test queries (BRI: mean log best rank, lower is "
        "better); the best value of each column is bold.</caption>",
        "<thead><tr>",
        '<th class="method">Method</th>',
        *(f"<th>{html.escape(name)}</th>" for name, _, _, _ in cols),
        "<th>queries</th><th>time (s)</th>",
        "</tr></thead>",
        "<tbody>",
    ]
    for m in methods:
        cells = [f'<td class="method">{html.escape(m["label"])}</td>']
        for (_, get, _, fmt), b in zip(cols, best, strict=True):
            v = _number(get(m))
            if not math.isfinite(v):
                cells.append("<td>&ndash;</td>")
                continue
            text = format(v, fmt)
            cells.append(f"<td><b>{text}</b></td>" if v == b else f"<td>{text}</td>")
        q, s = m["queries"], _number(m["seconds"])
        cells.append(f"<td>{html.escape(str(q)) if q is not None else '&ndash;'}</td>")
        cells.append(f"<td>{s:.1f}</td>" if math.isfinite(s) else "<td>&ndash;</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>", "</body>", "</html>", ""]
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text("\n".join(lines))


def run(cfg: dict[str, Any], metrics: list[str], out_dir: str) -> None:
    """Write recall_vs_round.png, bri.png, metrics.tsv and metrics.html into ``out_dir``."""
    methods = load_metrics(list(metrics))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_recall(methods, out / "recall_vs_round.png")
    plot_bri(methods, out / "bri.png")
    write_tsv(methods, out / "metrics.tsv")
    write_html(methods, out / "metrics.html")
    for m in methods:
        first, last = m["per_round"][0], m["per_round"][-1]
        log.info("%s: R@1 %.1f -> %.1f after round %d, BRI %s", m["label"], _number(first["R1"]),
                 _number(last["R1"]), last["round"], m["BRI"])
    log.info("wrote plots and tables of %d methods to %s", len(methods), out)
