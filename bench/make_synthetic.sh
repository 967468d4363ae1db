#!/usr/bin/env bash
# Render a synthetic dataset variant for bench/retriever_sweep.py (no Snakemake needed):
#   bench/make_synthetic.sh OUT_DIR 'PYTHON-EXPRESSION-EDITING-c'
# e.g. bench/make_synthetic.sh /tmp/d3 "c['data']['synthetic']['identities']['train'] = 1920"
set -euo pipefail
out=$1
edit=${2:-pass}
cfg="$out.config.json"
python3 -c "import json, yaml
c = yaml.safe_load(open('$(dirname "$0")/../config.yaml'))
$edit
print(json.dumps(c))" > "$cfg"
python3 -m llava_reid.cli synthesize --config "$cfg" --out-dir "$out"
python3 -m llava_reid.cli load-annotations --config "$cfg" --annotations "$out/annotations.json" \
    --image-root "$out" --out "$out/annotations.parquet"
