#!/usr/bin/env bash
# The GPU half of the bench suite (issue targets 4a, 4b, 4c, 4f at LLaVA-1.5-7B's shapes, bf16), as one
# command for a lent GPU machine: results and profiles go to $OUT (default ./gpu-bench).
set -o pipefail
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  python3 adapter_layer.py --dims 256,4096 --device cuda --dtype bfloat16 --tokens 704 --repeats 20 --json "$OUT/adapter_layer.json"
  python3 llava_suite.py --json "$OUT/llava_suite.json" --profile "$OUT"
} 2>&1 | tee "$OUT/suite.log"
