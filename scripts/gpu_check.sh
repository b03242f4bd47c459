#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU: the tests marked `gpu` (every task on cuda with gloo ranks sharing
# the GPU and with simulated ranks, NCCL at world size 1, bf16 and fp16, kill -9 and a bit-exact resume on cuda,
# the device of every tensor), then benchmarks/gpu_throughput.py. Writes $GPU_RESULTS (default results/gpu_throughput):
# machine.txt, tests.log, throughput.csv, throughput.md, throughput.log. Then benchmarks/one_gpu_cifar10.py: an epoch of
# each Table 1 CIFAR-10 cell as 32 simulated ranks on this GPU, and the cost of a row (results/one_gpu_cifar10).
#   scripts/gpu_check.sh                           # where the project is installed (make install)
#   PYTHONPATH=$PWD PYTHON=python3 scripts/gpu_check.sh   # where it is not (torch, hydra-core, pytest importable)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_RESULTS:-results/gpu_throughput}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU is visible: the GPU checks need one')"
mkdir -p "$OUT_DIR"
{ nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"; } \
  | tee "$OUT_DIR/machine.txt"
set +e
"$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT_DIR/tests.log"
tests=${PIPESTATUS[0]}
"$PY" benchmarks/gpu_throughput.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/throughput.log"
bench=${PIPESTATUS[0]}
CIFAR_DIR=${CIFAR_RESULTS:-results/one_gpu_cifar10}
"$PY" benchmarks/one_gpu_cifar10.py --out "$CIFAR_DIR" 2>&1 | tee "$OUT_DIR/one_gpu_cifar10.log"
cifar=${PIPESTATUS[0]}
set -e
echo "gpu tests: exit $tests; benchmarks: exit $bench (throughput), $cifar (one-GPU CIFAR-10); results in $OUT_DIR, $CIFAR_DIR"
exit $(( tests != 0 || bench != 0 || cifar != 0 ))
