#!/usr/bin/env bash
# One GPU call that re-checks what only a GPU can check, for the device tool (carry: wheels):
#   1. the GPU test tier (`pytest -m gpu`: kernels at 8B shapes, fused LoRA / nf4 dequant on CUDA, the
#      benchmark runner on CUDA),
#   2. loss parity of the real Accelerate FSDP1 and FSDP2 paths with the fused-ops stack (25 steps, bf16).
# Usage (repository root):  bash benchmarks/gpu_verify.sh "$OUT/verify"
# Writes setup.log, gpu_tests.log, parity.log and parity/ under the given folder; prints a short summary.
# Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_verify.sh OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0
if ! bash benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1; then
  echo "[gpu_verify] setup failed:"; tail -20 "$OUT/setup.log"; exit 1
fi
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT/gpu_tests.log" 2>&1
rc=$?; [ "$rc" -eq 0 ] || status=1
echo "[gpu_verify] pytest -m gpu: exit $rc"; tail -5 "$OUT/gpu_tests.log"
"$PY" benchmarks/gpu_fsdp_parity.py --out "$OUT/parity" --steps 25 --mixed-precision bf16 \
  --acceleration-config benchmarks/fsdp_parity_foak.yaml > "$OUT/parity.log" 2>&1
rc=$?; [ "$rc" -eq 0 ] || status=1
echo "[gpu_verify] FSDP parity: exit $rc"; tail -25 "$OUT/parity.log"
exit "$status"
