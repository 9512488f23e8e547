#!/usr/bin/env bash
# SRD vs input x gradient on one GPU (<= 8 minutes): ResNet-50 and ConvNeXt-T, batch 64, 224,
# float32 and bfloat16, eager / torch.compile / CUDA graphs, maps checked against CPU float64.
#   benchmarks/gpu_check.sh                        # on a CUDA machine
#   benchmarks/gpu_check.sh --device cpu --quick   # the dry run (CI: tests/core/test_device_ready.py)
# Options are those of benchmarks/gpu_check.py (--models, --dtypes, --modes, --budget, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
