"""Figures and tables comparing the evaluated methods round by round.

Reads every method's ``eval/{method}/metrics.json`` and, for bootstrap confidence intervals over
the test queries (see ``bootstrap``), its ``eval/{method}/dialogues.parquet``; writes into one
folder:

- ``recall_vs_round.png``: R@1, R@5 and R@10 against the dialogue round, one panel per metric,
  one line per method with its 95 % interval as error bars;
- ``bri.png``: the Best-Rank Improvement of each method (lower is better);
- ``metrics.tsv``: one row per method and round (R1, R5, R10, mAP, mINP in percent, and the
  method's BRI), values written exactly as read, then the interval bounds of R1, R5 and R10;
- ``metrics.html``: a small table for the Snakemake report: methods as rows, R@1 (with its
  interval) after every round and the final R@5/R@10/mAP/mINP and BRI as columns, the best
  value of each column bold; below it the paired differences of the final R@1 between methods.

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

import numpy as np

from llava_reid.artifacts import atomic_path, read_metadata
from llava_reid.report import bootstrap

log = logging.getLogger(__name__)

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
RECALLS = (("R1", "R@1"), ("R5", "R@5"), ("R10", "R@10"))
DPI = 120
RECALL_FIGSIZE = (13.0, 4.6)
DODGE = 0.07  # horizontal offset between methods at one round
BRI_FIGSIZE_HEIGHT = 4.2
CI_KEYS = ("R1", "R5", "R10")
TSV_COLUMNS = ("method", "label", "round", *METRICS, "BRI", "queries",
               *(f"{k}_{end}" for k in CI_KEYS for end in ("low", "high")))


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
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise MetricsError(f"{path}: cannot read metrics ({exc})") from exc
        for key in ("method", "per_round"):
            if key not in data:
                raise MetricsError(f"{path}: key {key!r} missing")
        name = str(data["method"])
        if name in seen:
            raise MetricsError(f"{path}: method {name!r} given twice")
        seen.add(name)
        per_round = _per_round(path, data["per_round"], "per_round")
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


def attach_intervals(methods: list[dict[str, Any]], dialogues: list[str], seed: int,
                     resamples: int = bootstrap.RESAMPLES,
                     ) -> tuple[list[bootstrap.Ranks], np.ndarray]:
    """Add ``ci`` (``{"R1": (low, high), ...}`` in percent) to every per-round entry, from the
    methods' dialogues (one file per method, same order). Every method is resampled with the
    same query sets, so differences between methods are paired. Returns the methods' target
    ranks and those resampled query indices."""
    if len(dialogues) != len(methods):
        raise MetricsError(f"{len(dialogues)} dialogue files for {len(methods)} metrics files")
    all_ranks = []
    for m, path in zip(methods, dialogues, strict=True):
        named = read_metadata(path).get("method")
        if named is not None and named != m["method"]:
            raise MetricsError(f"{path}: dialogues of method {named!r}, expected {m['method']!r}"
                               " (give the dialogues in the order of the metrics)")
        ranks = bootstrap.load_ranks(path)
        if len(ranks.ranks) != len(m["per_round"]):
            raise MetricsError(f"{path}: {len(ranks.ranks)} rounds, but the metrics of "
                               f"{m['method']!r} have {len(m['per_round'])}")
        if all_ranks and not np.array_equal(ranks.query_ids, all_ranks[0].query_ids):
            raise MetricsError(f"{path}: other test queries than {dialogues[0]}")
        all_ranks.append(ranks)
    idx = bootstrap.resample_indices(len(all_ranks[0].query_ids), seed, resamples)
    for m, ranks in zip(methods, all_ranks, strict=True):
        for entry, ci, round_ranks in zip(m["per_round"], bootstrap.recall_intervals(ranks, idx),
                                          ranks.ranks, strict=True):
            entry["ci"] = ci
            point = 100.0 * float((round_ranks <= 1).mean())
            if abs(point - _number(entry["R1"])) > 0.01:
                log.warning("%s round %d: R@1 %.3f in metrics.json, %.3f from the dialogues' "
                            "target ranks (the interval is around the latter)", m["method"],
                            entry["round"], _number(entry["R1"]), point)
    return all_ranks, idx


def paired_differences(methods: list[dict[str, Any]], ranks: list[bootstrap.Ranks],
                       idx: np.ndarray) -> list[dict[str, Any]]:
    """Final-round R@1 of every method minus that of every method listed before it, in points,
    with the paired bootstrap interval."""
    rows = []
    for i, (a, ra) in enumerate(zip(methods, ranks, strict=True)):
        for b, rb in zip(methods[i + 1:], ranks[i + 1:], strict=True):
            r = min(len(ra.ranks), len(rb.ranks)) - 1
            diff, lo, hi = bootstrap.difference_interval(rb, ra, r, idx)
            rows.append({"method": b["label"], "baseline": a["label"], "round": r,
                         "diff": diff, "low": lo, "high": hi})
    return rows


def _with_auxiliary(path: str, method: dict[str, Any], aux: dict[str, Any]) -> dict[str, Any]:
    """A method's rounds re-ranked with an external retriever's similarity fused in, shown as
    one more row/line beside the method itself."""
    per_round = _per_round(path, aux.get("per_round") or [], "with_auxiliary.per_round")
    return {**method, "method": f"{method['method']}+auxiliary",
            "label": f"{method['label']} + auxiliary (w={aux.get('weight')})",
            "per_round": per_round, "BRI": aux.get("BRI"), "auxiliary": True}


def _per_round(path: str, entries: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The checked metric entries of ``where`` in a metrics.json, rounds ascending."""
    per_round = []
    for entry in entries:
        missing = [k for k in ("round", *METRICS) if k not in entry]
        if missing:
            raise MetricsError(f"{path}: {where} entry lacks {missing}")
        per_round.append({"round": int(entry["round"]), **{k: entry[k] for k in METRICS}})
    if not per_round:
        raise MetricsError(f"{path}: {where} is empty")
    return sorted(per_round, key=lambda e: e["round"])


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


def save_figure(fig: Any, path: Path) -> None:
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
                # Methods side by side around each round, so their interval bars stay apart.
                shift = DODGE * (i - (len(methods) - 1) / 2)
                rounds = [e["round"] + shift for e in m["per_round"]]
                values = [_number(e[key]) for e in m["per_round"]]
                ax.plot(rounds, values, marker=markers[i % len(markers)], color=color,
                        linewidth=1.8, markersize=5, label=m["label"])
                if all("ci" in e for e in m["per_round"]):
                    below = [v - e["ci"][key][0] for v, e in zip(values, m["per_round"],
                                                                 strict=True)]
                    above = [e["ci"][key][1] - v for v, e in zip(values, m["per_round"],
                                                                 strict=True)]
                    ax.errorbar(rounds, values, yerr=[[max(b, 0.0) for b in below],
                                                      [max(a, 0.0) for a in above]],
                                fmt="none", ecolor=color, elinewidth=1.2, capsize=3, alpha=0.8)
            ax.set_title(name)
            ax.set_xlabel("round (0 = initial description)")
            ax.set_ylabel(f"{name} (%)")
            ax.set_xlim(-0.4, max(max_round, 1) + 0.4)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        with_ci = any("ci" in e for m in methods for e in m["per_round"])
        fig.suptitle("Target retrieved in the top k after each round of dialogue"
                     + (f" (bars: {bootstrap.CONFIDENCE:.0%} bootstrap interval over queries)"
                        if with_ci else ""))
        fig.legend(handles, labels, loc="lower center", ncol=min(len(methods), 5), frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 0.97))
        save_figure(fig, path)


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
        save_figure(fig, path)


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
            ci = entry.get("ci", {})
            bounds = [cell(round(v, 3)) if k in ci else "" for k in CI_KEYS
                      for v in ci.get(k, (None, None))]
            writer.writerow(
                [m["method"], m["label"], entry["round"], *(cell(entry[k]) for k in METRICS),
                 cell(m["BRI"]), cell(m["queries"]), *bounds]
            )
    with atomic_path(path, suffix=".tsv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


Column = tuple[str, Any, bool, str, Any]


def _table_columns(methods: list[dict[str, Any]]) -> list[Column]:
    """(header, value getter, higher is better, format, interval getter or None) for each
    column of the HTML table."""
    rounds = sorted({e["round"] for m in methods for e in m["per_round"]})
    finals = {m["per_round"][-1]["round"] for m in methods}
    final_name = f"after round {finals.pop()}" if len(finals) == 1 else "final"

    def entry_at(m: dict[str, Any], r: int) -> dict[str, Any]:
        return next((e for e in m["per_round"] if e["round"] == r), {})

    def at_round(key: str, r: int):
        return lambda m: entry_at(m, r).get(key)

    def interval_at(key: str, r: int):
        return lambda m: entry_at(m, r).get("ci", {}).get(key)

    def final(key: str):
        return lambda m: m["per_round"][-1][key]

    cols: list[Column] = []
    for r in rounds:
        name = "R@1 initial" if r == 0 else f"R@1 after round {r}"
        cols.append((name, at_round("R1", r), True, ".1f", interval_at("R1", r)))
    for key, name in (("R5", "R@5"), ("R10", "R@10"), ("mAP", "mAP"), ("mINP", "mINP")):
        cols.append((f"{name} {final_name}", final(key), True, ".1f", None))
    cols.append(("BRI (lower is better)", lambda m: m["BRI"], False, ".3f", None))
    return cols


_CSS = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; font-size: 14px; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
th { background: #eee; }
td.method, th.method { text-align: left; }
span.ci { color: #666; font-size: 12px; white-space: nowrap; }
caption { caption-side: bottom; text-align: left; padding-top: 6px; color: #555; }
""".strip()


def _metrics_table(methods: list[dict[str, Any]]) -> list[str]:
    cols = _table_columns(methods)
    best: list[float | None] = []
    for _, get, higher, _, _ in cols:
        vals = [v for v in (_number(get(m)) for m in methods) if math.isfinite(v)]
        best.append((max(vals) if higher else min(vals)) if vals else None)
    has_ci = any(ci is not None and ci(m) is not None for *_, ci in cols for m in methods)
    lines = [
        "<table>",
        "<caption>Percentages over all test queries (BRI: mean log best rank, lower is "
        "better); the best value of each column is bold."
        + (f" Under R@1: its {bootstrap.CONFIDENCE:.0%} bootstrap interval "
           f"({bootstrap.RESAMPLES:,} resamples of the test queries)." if has_ci else "")
        + "</caption>",
        "<thead><tr>",
        '<th class="method">Method</th>',
        *(f"<th>{html.escape(name)}</th>" for name, *_ in cols),
        "<th>queries</th><th>time (s)</th>",
        "</tr></thead>",
        "<tbody>",
    ]
    for m in methods:
        cells = [f'<td class="method">{html.escape(m["label"])}</td>']
        for (_, get, _, fmt, interval), b in zip(cols, best, strict=True):
            v = _number(get(m))
            if not math.isfinite(v):
                cells.append("<td>&ndash;</td>")
                continue
            text = format(v, fmt)
            text = f"<b>{text}</b>" if v == b else text
            ci = interval(m) if interval is not None else None
            if ci is not None:
                text += f'<br><span class="ci">{ci[0]:{fmt}}&ndash;{ci[1]:{fmt}}</span>'
            cells.append(f"<td>{text}</td>")
        q, s = m["queries"], _number(m["seconds"])
        cells.append(f"<td>{html.escape(str(q)) if q is not None else '&ndash;'}</td>")
        cells.append(f"<td>{s:.1f}</td>" if math.isfinite(s) else "<td>&ndash;</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return lines


def _differences_table(differences: list[dict[str, Any]]) -> list[str]:
    lines = [
        "<table>",
        f"<caption>Difference in R@1 (points) after the last round, with its "
        f"{bootstrap.CONFIDENCE:.0%} paired bootstrap interval (every method resampled with the "
        "same test queries); bold where the interval excludes 0.</caption>",
        '<thead><tr><th class="method">Method</th><th class="method">minus</th>'
        "<th>R@1 difference</th><th>interval</th></tr></thead>",
        "<tbody>",
    ]
    for d in differences:
        clear = d["low"] > 0 or d["high"] < 0
        diff = f"{d['diff']:+.1f}"
        lines.append(
            f'<tr><td class="method">{html.escape(d["method"])}</td>'
            f'<td class="method">{html.escape(d["baseline"])}</td>'
            f"<td>{f'<b>{diff}</b>' if clear else diff}</td>"
            f"<td>{d['low']:+.1f} to {d['high']:+.1f}</td></tr>")
    lines += ["</tbody>", "</table>"]
    return lines


def write_html(methods: list[dict[str, Any]], path: Path,
               differences: list[dict[str, Any]] | None = None) -> None:
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8"><title>Interactive retrieval: metrics per method</title>',
        f"<style>\n{_CSS}\n</style></head>",
        "<body>",
        *_metrics_table(methods),
        *(_differences_table(differences) if differences else []),
        "</body>",
        "</html>",
        "",
    ]
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")


def run(cfg: dict[str, Any], metrics: list[str], dialogues: list[str], out_dir: str) -> None:
    """Write recall_vs_round.png, bri.png, metrics.tsv and metrics.html into ``out_dir``; the
    intervals come from ``dialogues`` (one per metrics file, same order), seeded by
    ``cfg["seed"]``."""
    methods = load_metrics(list(metrics))
    # Intervals and paired differences for the dialogues as they ran; the fused "+auxiliary"
    # rows have no dialogues file of their own.
    own = [m for m in methods if not m.get("auxiliary")]
    ranks, idx = attach_intervals(own, list(dialogues), int(cfg["seed"]))
    differences = paired_differences(own, ranks, idx)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_recall(methods, out / "recall_vs_round.png")
    plot_bri(methods, out / "bri.png")
    write_tsv(methods, out / "metrics.tsv")
    write_html(methods, out / "metrics.html", differences)
    for m in methods:
        first, last = m["per_round"][0], m["per_round"][-1]
        lo, hi = last.get("ci", {}).get("R1", (float("nan"), float("nan")))
        log.info("%s: R@1 %.1f -> %.1f [%.1f, %.1f] after round %d, BRI %s", m["label"],
                 _number(first["R1"]), _number(last["R1"]), lo, hi, last["round"], m["BRI"])
    for d in differences:
        log.info("R@1 %s minus %s: %+.1f [%+.1f, %+.1f]", d["method"], d["baseline"], d["diff"],
                 d["low"], d["high"])
    log.info("wrote plots and tables of %d methods to %s", len(methods), out)
