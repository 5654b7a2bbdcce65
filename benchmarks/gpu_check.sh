#!/usr/bin/env bash
# GPU checks for a lent H100/H200 (see benchmarks/gpu_check.py). The device machine has no network:
# it needs a CUDA torch there (the machine's own, or wheels carried in /.whl/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv || true
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA torch'; print(torch.__version__)"
$PY -m tools.protos
$PY -m benchmarks.gpu_check --device cuda --out "${OUT:-.}/gpu_check.json" 2>&1 | tee "${OUT:-.}/gpu_check.log"
