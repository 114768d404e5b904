#!/usr/bin/env bash
# The GPU suite in one call, for a CUDA machine with torch and triton installed and no
# network: build the extension, run the GPU tests, run the benchmark at the AVE shapes.
# The benchmark also writes winners.json: the fastest GPU backend per shape and mode, the
# rows to review and copy into dgsct_kernels/measured_winners.json for `auto`; its eval
# rows for triton and cuda carry the roofline floor and the measured time over it
# (roofline_ms, vs_roofline), which compares the plan's estimate with the GPU.
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR
# Environment: DGSCT_CUDA_ARCHS (default 90a), COMPILE_MODE (default max-autotune),
# SHAPES (default all), FRAMES (default 80), TEST_BUDGET_S (240), SUITE_BUDGET_S (480).
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
start=$(date +%s)
elapsed() { echo "[gpu_suite] $1 at $(( $(date +%s) - start )) s"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.csv" 2>&1 || true
DGSCT_CUDA_ARCHS=${DGSCT_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
  pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
python -m dgsct_kernels.info | tee "$out/info.txt"
grep -q "^cuda extension: built" "$out/info.txt" || echo "[gpu_suite] WARNING: the CUDA extension was not built; the cuda backend will be skipped (set DGSCT_FORCE_CUDA=1 or put nvcc on PATH)"
elapsed "built"

# GPU parity tests (Triton compiles for real here, not through the interpreter)
set +e
# the whole suite must fit one 10-minute device call: the tests get at most 4 minutes
DGSCT_GPU_TESTS=1 timeout "${TEST_BUDGET_S:-240}" python -m pytest -m gpu -q -ra -p no:cacheprovider \
  tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
tests_status=${PIPESTATUS[0]}
set -e
elapsed "tests done (status $tests_status)"

# the benchmark starts no new case once the suite has run 8 minutes; rows are written per case
budget=$(( ${SUITE_BUDGET_S:-480} - ($(date +%s) - start) ))
DGSCT_GPU_TESTS=1 python benchmarks/run.py --device cuda --dtype bfloat16 --frames "${FRAMES:-80}" \
  --shapes "${SHAPES:-all}" --compile-mode "${COMPILE_MODE:-max-autotune}" --out "$out/bench-bf16" \
  --time-budget "$(( budget > 30 ? budget : 30 ))" \
  2> "$out/bench-bf16.log" | tee "$out/bench-bf16.txt"
elapsed "benchmark done"
exit "$tests_status"
