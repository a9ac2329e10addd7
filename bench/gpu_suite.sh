#!/usr/bin/env bash
# The GPU half of the speed benchmarks (one adapted linear; CRAM's training step, generation and the data path
# at LLaVA-1.5-7B's shapes, bf16), as one command for a lent GPU machine: results and profiles go to $OUT
# (default ./gpu-bench, relative to where it is started).
#
#     bash bench/gpu_suite.sh          # or: python -m bench gpu_suite
set -o pipefail
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."   # the repository root: python -m bench runs from there
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  python3 -m bench adapter_layer --dims 256,4096 --device cuda --dtype bfloat16 --tokens 704 --repeats 20 --json "$OUT/adapter_layer.json"
  python3 -m bench llava_suite --json "$OUT/llava_suite.json" --profile "$OUT"
} 2>&1 | tee "$OUT/suite.log"
