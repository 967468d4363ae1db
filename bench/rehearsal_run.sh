#!/usr/bin/env bash
# The dress rehearsal of the real preset on one GPU machine (bench/RESULTS.md, "Dress
# rehearsal"). From the repository root, with snakemake on the PATH and the package importable
# (installed, or PYTHONPATH=src):
#   bench/rehearsal_run.sh start [CORES]  # assets, then the DAG detached (setsid); returns
#   bench/rehearsal_run.sh wait SECONDS   # until the DAG ends or SECONDS pass
#   bench/rehearsal_run.sh collect DIR    # DIR/rehearsal.tar.gz: benchmarks, logs, GPU samples
# The DAG runs detached so that a session whose commands have a time limit can poll it.
set -uo pipefail
cmd=${1:?usage: rehearsal_run.sh start [CORES] | wait SECONDS | collect DIR}
assets=results/rehearsal-assets
run=results/rehearsal
configs="workflow/presets/interactive-pedes.yaml workflow/presets/rehearsal.yaml"
mkdir -p results

case $cmd in
start)
    cores=${2:-16}
    if ! command -v llava-reid >/dev/null; then # package imported from src/, not installed
        mkdir -p results/bin
        printf '#!/bin/sh\nexec python3 -m llava_reid.cli "$@"\n' >results/bin/llava-reid
        chmod +x results/bin/llava-reid
        export PATH=$PWD/results/bin:$PATH
    fi
    # GPU memory in use, every second, for the per-stage peaks (read beside the job times).
    setsid nohup nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu \
        --format=csv,noheader -l 1 >results/gpu_samples.csv 2>&1 &
    date -u +%FT%TZ >results/started
    python3 bench/rehearsal_assets.py --out $assets --only data >results/assets_data.log 2>&1 &
    data=$!
    # REHEARSAL_ENCODER_FROM: all-MiniLM-L6-v2's config/tokenizer, where its package is absent.
    python3 bench/rehearsal_assets.py --out $assets --only models \
        ${REHEARSAL_ENCODER_FROM:+--encoder-from "$REHEARSAL_ENCODER_FROM"} \
        >results/assets_models.log 2>&1 ||
        { tail -20 results/assets_models.log; exit 1; }
    wait $data || { tail -20 results/assets_data.log; exit 1; }
    date -u +%FT%TZ >results/assets_done
    # --resources gpu=1: one GPU job at a time, so each job's time and memory are its own.
    setsid nohup bash -c "snakemake --cores $cores --resources gpu=1 --keep-going \
        --rerun-incomplete --printshellcmds --configfile $configs >results/snakemake.log 2>&1;
        echo \$? >results/snakemake.rc" >/dev/null 2>&1 &
    echo "DAG started: results/snakemake.log"
    ;;
wait)
    deadline=$((SECONDS + ${2:?seconds}))
    while [ ! -e results/snakemake.rc ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
    grep -E "steps \(|Error in rule" results/snakemake.log | tail -3
    [ -e results/snakemake.rc ] && echo "DAG ended, rc=$(cat results/snakemake.rc)" ||
        echo "DAG still running"
    ;;
collect)
    dir=${2:?dir}
    [ -e results/snakemake.rc ] &&
        snakemake --summary --configfile $configs >results/summary.tsv 2>/dev/null
    grep -H "usage " $run/logs/*.log >results/usage.txt 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >results/gpu.txt
    tar czf "$dir/rehearsal.tar.gz" --ignore-failed-read $run/benchmarks $run/logs \
        $run/*/metrics.json $run/*/warmup_metrics.json $run/eval/*/metrics.json \
        results/snakemake.log results/snakemake.rc results/summary.tsv results/usage.txt \
        results/gpu.txt results/gpu_samples.csv results/started results/assets_done \
        results/assets_*.log $assets/built-*.json .snakemake/log 2>/dev/null
    ls -la "$dir"
    ;;
*)
    echo "unknown command: $cmd" >&2
    exit 2
    ;;
esac
