#!/usr/bin/env bash
# GPU check: the demo recipe with evaluation on CUDA, then the search-scale benchmark's
# evaluation and search on the GPU, printing times and memory. Run it on any machine with
# a CUDA GPU (`bash bench/gpu_check.sh`); nothing in the test suite needs one.
set -euo pipefail
cd "$(dirname "$0")/.."
make .venv/.installed >/dev/null
PY=.venv/bin/python
export GLUE_HOME=${GLUE_HOME:-$PWD/.glue}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

$PY - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA device (torch %s)" % torch.__version__)
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda)
EOF

.venv/bin/glue zoo build
work=$(mktemp -d)
# the demo config, evaluated on the GPU in the checkpoints' dtype, in its own store
$PY - "$GLUE_HOME/zoo/glue.yaml" "$work/glue.yaml" <<'EOF'
import sys, yaml
src, dst = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["zoo"] = [{**m, "path": str((__import__("pathlib").Path(src).parent / m["path"]).resolve())} for m in cfg["zoo"]]
cfg["evaluation"] |= {"device": "cuda", "dtype": "auto"}
cfg["store"], cfg["lineage_db"] = "store", "lineage.duckdb"
yaml.safe_dump(cfg, open(dst, "w"))
EOF
start=$(date +%s)
.venv/bin/glue run "$work/glue.yaml"
echo "demo recipe on cuda: $(( $(date +%s) - start )) s"
.venv/bin/glue sql "SELECT stage, count(*) AS runs, round(sum(seconds), 1) AS seconds FROM runs GROUP BY stage ORDER BY seconds DESC" --db "$work/lineage.duckdb"

# search-scale on the GPU: evaluation and search children on cuda (each reports its
# process's peak host memory and torch's peak GPU allocation)
$PY bench/scale_bench.py --kinds eval,search --sizes 3,6 --device cuda
