"""The workflow on a real one-node SLURM cluster, through profiles/slurm and
snakemake-executor-plugin-slurm.

The module fixture starts the cluster with tests/slurm/start_cluster.sh (Debian's slurmctld,
slurmd and munge, installed with apt-get when missing; fake GPUs) and stops it afterwards,
whatever happened. The test builds PREBUILT locally, runs the README's one-time step
(`llava-reid install-profile`, into a temporary Snakemake config folder), then builds TARGETS
with the command users type, `snakemake --profile slurm` (plus a second profile that fits the
jobs on this small machine), and checks for every rule that ran under SLURM: its artifacts
exist and are not empty, it went through sbatch, and the SLURM job record shows the GPUs that
profiles/slurm names for that rule.

Opt-in (marker `slurm`, deselected by default): `python3 -m pytest -m slurm tests/test_slurm.py`.
Needs root (packages, daemons) and apt-get or an installed SLURM; skips otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, small_config

pytestmark = pytest.mark.slurm

# Artifacts (relative to results/{run}/) that the SLURM run must build. Between them they
# should reach a CPU rule, 1-GPU rules, a multi-GPU rule and the evaluation scatter; the
# test asks Snakemake which rules that takes and checks each against profiles/slurm.
# Each step of the chain costs >= ~35 s here, mostly the plugin's status polling.
TARGETS = [
    "features/val_gallery.parquet",  # cache_features (1 GPU), beside the test split's
    "eval/initial/metrics.json",  # cache_features, evaluate x chunks (1 GPU each), merge_eval (CPU)
    # Multi-GPU: build_tiny_questioner (CPU), prepare_data, cache_visual_tokens and
    # train_questioner (4 GPUs: 4 torchrun ranks, gloo on CPU); adds ~1.5-2 min here.
    "questioner/metrics.json",
]
# Built locally (plain `snakemake --cores`) before the SLURM run, to keep the test short:
# upstream stages that the SLURM run then finds up to date.
PREBUILT = ["retriever/model"]

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
START = REPO / "tests" / "slurm" / "start_cluster.sh"
STOP = REPO / "tests" / "slurm" / "stop_cluster.sh"
# A fixed folder: a cluster left over by an interrupted session is found and restarted.
CLUSTER_DIR = Path(os.environ.get("LLAVA_REID_SLURM_DIR", "/tmp/llava-reid-slurm"))
PARTITION = "debug"
GPU_MODEL = "fake"
RUN_TIMEOUT = int(os.environ.get("LLAVA_REID_SLURM_TIMEOUT", "600"))


def profile_resources() -> dict[str, dict]:
    """profiles/slurm's set-resources: rule -> {resource: value}."""
    return yaml.safe_load(PROFILE.read_text())["set-resources"]


def profile_gpus(rule: str) -> int:
    return int(profile_resources().get(rule, {}).get("gpu", 0))


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (installs SLURM and munge, starts their daemons)"
    if not Path("/usr/sbin/slurmctld").exists() and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    conf = Path("/etc/slurm/slurm.conf")
    if conf.is_file() and not conf.is_symlink() and "start_cluster.sh" not in conf.read_text():
        return "this machine has a real SLURM configuration (/etc/slurm/slurm.conf)"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    gpus = max([4, *(profile_gpus(rule) for rule in profile_resources())])
    # Finished jobs stay in squeue/scontrol for MinJobAge: longer than the whole run.
    env = {**os.environ, "SLURM_TEST_GPUS": str(gpus), "SLURM_TEST_GPU_MODEL": GPU_MODEL,
           "SLURM_TEST_PARTITION": PARTITION, "SLURM_TEST_MIN_JOB_AGE": str(RUN_TIMEOUT + 300)}
    try:
        proc = subprocess.run(["bash", str(START), str(CLUSTER_DIR)], env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"start_cluster.sh failed:\n{proc.stdout}\n{proc.stderr}")
        yield {"dir": CLUSTER_DIR, "gpus": gpus}
    finally:
        subprocess.run(["bash", str(STOP), str(CLUSTER_DIR)], capture_output=True, timeout=120)


def _scontrol(jobid: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-d", jobid], capture_output=True,
                          text=True, check=True).stdout


def test_cluster_runs_a_multi_gpu_job_with_our_environment(slurm_cluster, tmp_path):
    """The fake GPUs are schedulable and visible, and jobs see the submitter's PATH."""
    n = slurm_cluster["gpus"]
    out = tmp_path / "job.out"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--gpus={GPU_MODEL}:{n}", "--cpus-per-task=1",
         "--mem=100", "-t", "2", "-p", PARTITION, "-o", str(out), "--wrap",
         'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; command -v llava-reid'],
        capture_output=True, text=True, timeout=120, env=_job_env())
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert f"CUDA_VISIBLE_DEVICES={','.join(map(str, range(n)))}" in text, text
    assert "llava-reid" in text, f"llava-reid is not on PATH inside a SLURM job:\n{text}"
    record = _scontrol(proc.stdout.strip().split(";")[0])
    assert f"JOB_GRES=gpu:{GPU_MODEL}:{n}" in record, record


def _job_env() -> dict[str, str]:
    """sbatch runs jobs with the submitter's environment (--export=ALL): make sure the
    interpreter's bin folder (llava-reid, snakemake) is on PATH there."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{path}"}


def slurm_test_config() -> dict:
    """conftest's small config, training cut to one epoch: the test is about where jobs run."""
    cfg = small_config()
    cfg["results"] = "results"
    cfg["retriever"].update(epochs=1, warmup_epochs=0)
    if "sft" in cfg.get("questioner", {}):
        cfg["questioner"]["sft"].update(epochs=1, eval_prompts=8)
    return cfg




def write_override(path: Path) -> None:
    """A second profile for the 2-core test machine. A later --profile replaces whole
    top-level keys, so set-resources restates every rule: the profile's GPUs (the thing under
    test), 1 CPU and little memory so that every job fits on the node. Plus fast status polling
    (MinJobAge on the test cluster is well above 3 x the first check's delay)."""
    rules = {}
    for rule, res in profile_resources().items():
        entry = {"cpus_per_task": 1, "mem_mb": 1500, "runtime": 30}
        if res.get("gpu"):
            entry["gpu"] = res["gpu"]
            if res.get("gpu_model"):
                entry["gpu_model"] = GPU_MODEL
        rules[rule] = entry
    override = {
        "default-resources": {"slurm_partition": PARTITION, "cpus_per_task": 1,
                              "mem_mb": 1500, "runtime": 30},
        "set-resources": rules,
        "retries": 0,
        "latency-wait": 5,
        "seconds-between-status-checks": 1,
        "slurm-init-seconds-before-status-checks": 1,
        "slurm-status-command": "squeue",
        "slurm-keep-successful-logs": True,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(override, sort_keys=False))


def _snakemake(work: Path, cfg_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(work), "--configfile", str(cfg_file),
            "--workflow-profile", "none", *args]


def install_slurm_profile(config_home: Path, env: dict[str, str]) -> None:
    """The README's one-time step, into a temporary Snakemake config folder."""
    proc = subprocess.run(["llava-reid", "install-profile"], capture_output=True, text=True,
                          env={**env, "XDG_CONFIG_HOME": str(config_home)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (config_home / "snakemake" / "slurm").resolve() == (REPO / "profiles" / "slurm")


def planned_jobs(work: Path, cfg_file: Path, targets: list[str]) -> dict[str, list[Path]]:
    """Ask Snakemake (--summary) what building the targets takes: rule -> outputs."""
    proc = subprocess.run(_snakemake(work, cfg_file, "--summary", *targets),
                          capture_output=True, text=True, env=_job_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("output_file\t"))
    cols = lines[header].split("\t")
    planned: dict[str, list[Path]] = {}
    for line in lines[header + 1:]:
        row = dict(zip(cols, line.split("\t"), strict=False))
        if row.get("plan", "no update") != "no update":
            planned.setdefault(row["rule"], []).append(work / row["output_file"])
    return planned


def parse_run_log(text: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """From a Snakemake --verbose log: snakemake jobid -> rule (jobs sent to SLURM, not
    localrules), snakemake jobid -> SLURM job id, and SLURM comment
    (rule_<name>[_wildcards_...]) -> sbatch call."""
    rule_of: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^(local)?rule (\w+):$", line):
            current = None if m.group(1) else m.group(2)
        elif (m := re.match(r"^\s+jobid: (\d+)$", line)) and current:
            rule_of[m.group(1)] = current
            current = None
    slurm_of = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", text))
    sbatch = {}
    for call in re.findall(r"sbatch call: (sbatch .*)", text):
        head = call.split(" --wrap=", 1)[0]
        if m := re.search(r"--comment '?([\w.-]+)'?", head):
            sbatch[m.group(1)] = head
    return rule_of, slurm_of, sbatch


def _gpus_in(pattern: str, text: str) -> int:
    """GPU count from 'gres:gpu[:model]:N' / 'gpu[:model]:N' in a SLURM job record."""
    m = re.search(pattern + r"=(?:gres:)?gpu(?::[\w.]+)?:(\d+)", text)
    return int(m.group(1)) if m else 0


def test_workflow_on_slurm(slurm_cluster, tmp_path):
    started = time.monotonic()
    work = tmp_path / "work"
    work.mkdir()
    cfg = slurm_test_config()
    cfg_file = work / "test-config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    override = tmp_path / "override"
    write_override(override)
    env = _job_env()
    assert shutil.which("llava-reid", path=env["PATH"]), "llava-reid not on PATH (pip install -e .)"
    run_dir = f"{cfg['results']}/{cfg['run']}"
    targets = [f"{run_dir}/{t}" for t in TARGETS]

    # Upstream stages, locally: the SLURM run finds them up to date.
    if PREBUILT:
        proc = subprocess.run(
            _snakemake(work, cfg_file, "--cores", "2", *[f"{run_dir}/{t}" for t in PREBUILT]),
            capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    planned = planned_jobs(work, cfg_file, targets)
    assert planned, "nothing to build under SLURM"

    # The run itself, as users type it after the one-time step (profiles/default, the
    # workflow profile, applies too); `timeout -k` because Snakemake ignores SIGTERM while
    # jobs are active.
    config_home = tmp_path / "xdg"
    install_slurm_profile(config_home, env)
    env["XDG_CONFIG_HOME"] = str(config_home)
    log = tmp_path / "snakemake.log"
    cmd = ["snakemake", "--profile", "slurm", "--profile", str(override),
           "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(cfg_file), "--verbose", *targets]
    with log.open("w") as fh:
        proc = subprocess.run(["timeout", "-k", "30", str(RUN_TIMEOUT), *cmd], stdout=fh,
                              stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    assert "Using profiles slurm and " in text, text[:2000]
    if proc.returncode in (124, 137):
        # Cancel this run's jobs (the plugin names them by the run id), then lift the lock.
        run_id = re.search(r"SLURM run ID: (\S+)", text)
        which = ["--name", run_id.group(1)] if run_id else ["--user", str(os.getuid())]
        subprocess.run(["scancel", "--full", *which], capture_output=True)
        subprocess.run(_snakemake(work, cfg_file, "--unlock"), capture_output=True, env=env)
        pytest.fail(f"snakemake on SLURM timed out after {RUN_TIMEOUT}s; squeue:\n"
                    + subprocess.run(["squeue", "--states=all"], capture_output=True,
                                     text=True).stdout + "\n" + _tail(text))
    assert proc.returncode == 0, _failure_report(text, work)
    elapsed = time.monotonic() - started

    rule_of, slurm_of, sbatch = parse_run_log(text)
    local_rules = set(re.findall(r"^localrule (\w+):$", text, flags=re.M))
    missing = sorted(set(planned) - set(profile_resources()) - local_rules)
    assert not missing, f"profiles/slurm names no resources for rules {missing}"
    jobs_of: dict[str, list[str]] = {}
    for smk_id, rule in rule_of.items():
        assert smk_id in slurm_of, f"job {smk_id} ({rule}) did not go through sbatch"
        jobs_of.setdefault(rule, []).append(slurm_of[smk_id])

    report = []
    for rule, outputs in sorted(planned.items()):
        # Artifacts exist and are not empty.
        for path in outputs:
            assert path.exists(), f"{rule}: {path} missing"
            if path.is_dir():
                assert any(p.is_file() for p in path.rglob("*")), f"{rule}: {path} is empty"
            else:
                assert path.stat().st_size > 0, f"{rule}: {path} is empty"
        # Went through sbatch, with the profile's GPUs.
        if rule in local_rules:
            continue
        assert jobs_of.get(rule), f"{rule}: no SLURM job in the log"
        want = profile_gpus(rule)
        for jobid in jobs_of[rule]:
            record = _scontrol(jobid)
            assert "JobState=COMPLETED" in record, record
            comment = re.search(r"Comment=(\S+)", record).group(1)
            assert comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_")
            requested = _gpus_in("TresPerJob", record)
            allocated = _gpus_in("JOB_GRES", record)
            assert (requested, allocated) == (want, want), (
                f"{rule}: profile names {want} GPUs, SLURM job {jobid} requested {requested}"
                f" and got {allocated}\n{record}")
            call = sbatch.get(comment, "")
            assert call, f"{rule}: no 'sbatch call' line for {comment}"
            has_gpus = re.search(r"--gpus=(?:[\w.]+:)?(\d+)\b", call)
            assert (int(has_gpus.group(1)) if has_gpus else 0) == want, call
            report.append(f"{rule}: SLURM job {jobid}, gpus={want}: {call}")
    print(f"\nSLURM run of {len(TARGETS)} targets in {elapsed:.0f}s:\n" + "\n".join(report))


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def _failure_report(text: str, work: Path) -> str:
    """The run log's tail plus the SLURM logs of the jobs (kept by the test override)."""
    parts = [_tail(text)]
    for slurm_log in sorted((work / ".snakemake" / "slurm_logs").rglob("*.log"))[-5:]:
        parts.append(f"--- {slurm_log}\n{_tail(slurm_log.read_text(), 30)}")
    return "\n".join(parts)
