#!/usr/bin/env bash
# Snakemake runs this once inside the new envs/train.yaml environment (`--sdm conda`), from a
# copy under .snakemake/conda/. The Snakefile exports LLAVA_REID_WORKFLOW_DIR (the workflow's
# folder). Editable: edits to src/ reach the jobs without rebuilding the environment.
# Snakemake rebuilds the environment when this file or train.yaml changes, so the lock's hash
# is kept here (python3 envs/freeze_constraints.py updates it):
# constraints.txt sha256: 07ffd5dd31975fe8877c1e7c73b3af6149fee66cc76ff769535a1f838dba49f7
set -euo pipefail
workflow_dir="${LLAVA_REID_WORKFLOW_DIR:?is set by the workflow Snakefile: create this environment through snakemake --sdm conda}"
python -m pip install --no-input -c "$workflow_dir/envs/constraints.txt" -e "$workflow_dir"
python -c "import llava_reid, torch, transformers"
