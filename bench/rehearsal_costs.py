"""Per-stage figures of the dress rehearsal and the cost sheet for the full Interactive-PEDES.

Reads what bench/rehearsal_run.sh collected (Snakemake's benchmark TSVs, the stage logs with
their ``usage`` lines, the nvidia-smi samples) from an unpacked rehearsal.tar.gz, prints the
per-job table and the full-scale estimate as Markdown, and writes the figures to JSON:

    python3 bench/rehearsal_costs.py DIR [--json bench/results/rehearsal.json]

Full-scale model (stated in bench/RESULTS.md): every job = a fixed part (process start, model
load, compilation) + a part proportional to its work. Where a rule ran at several sizes (the
three splits) the two parts come from a least-squares line; training rules use their
steady-state step time from the step log lines' timestamps; the rest scale the whole measured
time by the work ratio (an overestimate of the fixed part).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from datetime import datetime
from pathlib import Path

from llava_reid.stage_views import METHODS

# The full data set. Paper: 54,749 images, 13,051 identities; per-split counts are not in our
# sources. Test queries: 11,000-14,000 (bench/RESULTS.md, from the original's 5 h evaluation);
# the rest is training. No separate validation split is assumed beyond 1,000 images.
FULL = {"train_images": 41_000, "val_images": 1_000, "test_images": 12_600}
PRESET = {"retriever_epochs": 30, "retriever_batch": 128, "sft_epochs": 1, "sft_batch": 16,
          "joint_epochs": 1, "joint_batch": 16, "warmup_epochs": 10, "eval_chunks": 8,
          "rounds": 5}
MARGIN = 3.0  # SLURM time limit = estimate x MARGIN, rounded up to 30 min, at least 30 min

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")


def stamp(line: str) -> float | None:
    m = STAMP.match(line)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3


def read_benchmarks(root: Path) -> dict[str, dict[str, float]]:
    jobs = {}
    for tsv in sorted(root.glob("results/rehearsal/benchmarks/*.tsv")):
        with tsv.open() as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        jobs[tsv.stem] = {"seconds": float(row["s"]), "max_rss_mb": float(row["max_rss"])}
    return jobs


def read_usage(root: Path, jobs: dict) -> None:
    usage = root / "results/usage.txt"
    if not usage.exists():
        return
    for line in usage.read_text().splitlines():
        job = Path(line.split(":", 1)[0]).stem
        fields = dict(kv.split("=") for kv in line.split(": ", 2)[-1].split())
        if job in jobs:
            jobs[job].update({k: float(v) for k, v in fields.items() if k.startswith("gpu")})
            jobs[job]["stage_seconds"] = float(fields["seconds"])


def log_lines(root: Path, job: str) -> list[str]:
    path = root / f"results/rehearsal/logs/{job}.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def step_rate(lines: list[str]) -> tuple[float, int] | None:
    """Seconds per step between the first and last 'step i/n' lines, and n."""
    points = []
    for line in lines:
        m = re.search(r"step (\d+)/(\d+)", line)
        t = stamp(line)
        if m and t is not None:
            points.append((int(m.group(1)), t, int(m.group(2))))
    if len(points) < 2:
        return None
    (s0, t0, n), (s1, t1, _) = points[0], points[-1]
    return (t1 - t0) / (s1 - s0), n


def retriever_epochs(lines: list[str]) -> list[tuple[float, float]]:
    """(epoch seconds, step seconds) per epoch."""
    out = []
    for line in lines:
        m = re.search(r"epoch \d+/\d+ .* ([\d.]+)s \(steps ([\d.]+)s\)", line)
        if m:
            out.append((float(m.group(1)), float(m.group(2))))
    return out


def count(lines: list[str], pattern: str) -> int | None:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return int(m.group(1))
    return None


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (fixed, per unit) through (units, seconds)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def estimate(root: Path, jobs: dict) -> tuple[dict, dict]:
    """Full-scale seconds and GPU peak per rule, with the work counts they rest on."""
    ann = log_lines(root, "load_annotations")
    sizes = {s: count(ann, rf"{s}: (\d+) images") for s in ("train", "val", "test")}
    prep = log_lines(root, "prepare_data")
    convs = count(prep, r"plan steps, (\d+) conversations")
    idk = count(prep, r"conversations \((\d+) IDK")
    per_image = convs / sizes["train"]
    base_per_image = (convs - idk) / sizes["train"]
    full_convs = per_image * FULL["train_images"]
    full_base = base_per_image * FULL["train_images"]
    facts = {"rehearsal_images": sizes, "rehearsal_conversations": convs,
             "conversations_per_train_image": round(per_image, 3),
             "full_conversations": round(full_convs), "full": FULL, "preset": PRESET}
    est: dict[str, dict] = {}

    def put(rule, seconds, basis, gpu=None):
        peak = gpu if gpu is not None else max(
            (j.get("gpu_peak_reserved_gib", 0.0) for k, j in jobs.items() if k.startswith(rule)),
            default=0.0)
        rss = max((j["max_rss_mb"] for k, j in jobs.items() if k.startswith(rule)), default=0.0)
        est[rule] = {"seconds": seconds, "basis": basis, "gpu_peak_reserved_gib": peak,
                     "max_rss_mb": rss}

    # Features: least-squares line through the three splits (fixed part + per image).
    pts = [(sizes[s], jobs[f"cache_features_{s}"]["seconds"]) for s in sizes
           if f"cache_features_{s}" in jobs]
    if pts:
        fixed, per = line_fit(pts)
        full = {s: fixed + per * FULL[f"{s}_images"] for s in sizes}
        put("cache_features", max(full.values()),
            f"{fixed:.0f} s + {per * 1e3:.1f} ms/image (fit over the 3 splits); train split")
    # Visual tokens: the two splits are too close in size to separate the rate from the fixed
    # part (the first job also compiles the vision tower), so the rate is the questioner-loop
    # benchmark's slower SigLIP figure (481 images/s) plus 1 ms/image of PNG decoding.
    if "cache_visual_tokens_train" in jobs:
        fixed = jobs["cache_visual_tokens_train"]["seconds"]
        per = 1 / 481 + 1e-3
        put("cache_visual_tokens", fixed + per * FULL["train_images"],
            f"{fixed:.0f} s (first job, compiles) + {per * 1e3:.1f} ms/image; train split")
    if "train_retriever" in jobs:
        epochs = retriever_epochs(log_lines(root, "train_retriever"))
        steps_per_epoch = sizes["train"] // PRESET["retriever_batch"]
        step_s = sum(s for _, s in epochs[1:]) / max(1, len(epochs) - 1) / steps_per_epoch
        other_s = sum(e - s for e, s in epochs[1:]) / max(1, len(epochs) - 1)
        eval_share = other_s * FULL["val_images"] / sizes["val"]
        full_steps = PRESET["retriever_epochs"] * (FULL["train_images"] // PRESET["retriever_batch"])
        fixed = jobs["train_retriever"]["seconds"] - sum(e for e, _ in epochs)
        seconds = fixed + full_steps * step_s + PRESET["retriever_epochs"] * eval_share
        put("train_retriever", seconds,
            f"{step_s:.3f} s/step x {full_steps} steps + {PRESET['retriever_epochs']} x "
            f"{eval_share:.0f} s validation/checkpoint")
    for rule, epochs, batch, n in (("train_questioner", "sft_epochs", "sft_batch", full_convs),
                                   ("train_joint", "joint_epochs", "joint_batch", full_convs)):
        rate = step_rate(log_lines(root, rule))
        if rule in jobs and rate:
            step_s, steps = rate
            full_steps = PRESET[epochs] * math.ceil(n / PRESET[batch])
            fixed = max(0.0, jobs[rule]["seconds"] - step_s * steps)
            put(rule, fixed + step_s * full_steps,
                f"{step_s:.2f} s/step (batch {PRESET[batch]}) x {full_steps} steps + {fixed:.0f} s")
    if "warmup_selector" in jobs:
        lines = log_lines(root, "warmup_selector")
        epoch_s = [float(m.group(1)) for line in lines
                   if (m := re.search(r"warm-up epoch \d+/\d+: .*\(([\d.]+)s\)", line))]
        per_epoch = sum(epoch_s[1:]) / max(1, len(epoch_s) - 1) * full_base / (convs - idk)
        fixed = jobs["warmup_selector"]["seconds"] - sum(epoch_s)
        put("warmup_selector", fixed + PRESET["warmup_epochs"] * per_epoch,
            f"{fixed:.0f} s + {PRESET['warmup_epochs']} epochs x {per_epoch:.0f} s "
            "(epoch time x base-conversation ratio)")
    if "prepare_data" in jobs:
        j = jobs["prepare_data"]
        ratio = FULL["train_images"] / sizes["train"]
        put("prepare_data", j["seconds"] - j["stage_seconds"] + j["stage_seconds"] * ratio,
            f"start-up + whole stage ({j['stage_seconds']:.0f} s, model load included) x "
            f"{ratio:.0f} (train images)")
    for method in METHODS:
        chunk_jobs = [k for k in jobs if k.startswith(f"evaluate_{method}_")]
        if not chunk_jobs:
            continue
        per_dialogue, fixed = [], []
        for job in chunk_jobs:
            lines = log_lines(root, job)
            for line in lines:
                m = re.search(r"chunk \d+/\d+: (\d+) dialogues in ([\d.]+)s", line)
                if m:
                    per_dialogue.append(float(m.group(2)) / int(m.group(1)))
                    fixed.append(jobs[job]["seconds"] - float(m.group(2)))
        if per_dialogue:
            rate = sum(per_dialogue) / len(per_dialogue)
            fix = sum(fixed) / len(fixed)
            queries = FULL["test_images"] / PRESET["eval_chunks"]
            put(f"evaluate_{method}", fix + rate * queries,
                f"{fix:.0f} s + {rate * 1e3:.0f} ms/dialogue x {queries:.0f} per chunk")
    for rule in ("load_annotations", "init_retriever", "merge_eval", "report_plots",
                 "report_ranked_lists"):
        matching = [j for k, j in jobs.items() if k.startswith(rule)]
        if matching:
            j = max(matching, key=lambda j: j["seconds"])
            ratio = {"load_annotations": sum(FULL.values()) / sum(sizes.values()),
                     "merge_eval": FULL["test_images"] / sizes["test"]}.get(rule, 1.0)
            put(rule, j["seconds"] - j["stage_seconds"] + j["stage_seconds"] * ratio,
                "start-up + stage time" + (f" x {ratio:.0f} (images)" if ratio != 1 else ""))
    return est, facts


def slurm_minutes(seconds: float) -> int:
    return max(30, int(math.ceil(seconds * MARGIN / 60 / 30) * 30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.root)
    jobs = read_benchmarks(root)
    read_usage(root, jobs)
    print("| job | wall s | GPU peak allocated GiB | GPU peak reserved GiB | host RSS GB |")
    print("|---|---|---|---|---|")
    for job, j in jobs.items():
        print(f"| {job} | {j['seconds']:.1f} | {j.get('gpu_peak_allocated_gib', 0):.1f} | "
              f"{j.get('gpu_peak_reserved_gib', 0):.1f} | {j['max_rss_mb'] / 1e3:.1f} |")
    print(f"\ntotal job seconds: {sum(j['seconds'] for j in jobs.values()):.0f}")
    est, facts = estimate(root, jobs)
    print("\n" + json.dumps(facts))
    print("\n| rule | full-scale estimate (1 GPU) | GPU-h | basis | GPU peak GiB | host RSS GB "
          "| SLURM limit (x3) |")
    print("|---|---|---|---|---|---|---|")
    for rule, e in est.items():
        gpu_h = e["seconds"] / 3600 if e["gpu_peak_reserved_gib"] > 0 else 0.0
        print(f"| {rule} | {e['seconds'] / 3600:.2f} h | {gpu_h:.2f} | {e['basis']} | "
              f"{e['gpu_peak_reserved_gib']:.1f} | {e['max_rss_mb'] / 1e3:.1f} | "
              f"{slurm_minutes(e['seconds'])} min |")
    if args.json:
        Path(args.json).write_text(json.dumps({"jobs": jobs, "estimate": est, "facts": facts},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
