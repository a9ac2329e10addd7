#!/usr/bin/env bash
# bench/gpu_e2e.py on a lent GPU machine, as one command: the whole command line end to end at LLaVA-1.5-7B's and
# Qwen2-VL-7B's shapes (build, run, SIGKILL + --resume, export), summary.json / summary.md, the phases' logs and
# e2e.log to $OUT (default ./gpu-e2e, relative to where it is started). Flags go to the script, e.g.
#
#     bash bench/gpu_e2e.sh                      # both models, ~8 min
#     bash bench/gpu_e2e.sh --models qwen2_vl    # one
set -o pipefail
OUT=${OUT:-gpu-e2e}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."   # the repository root
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  df -h "${TMPDIR:-/tmp}" | tail -1
  python3 bench/gpu_e2e.py --out "$OUT" "$@"
} 2>&1 | tee "$OUT/e2e.log"
