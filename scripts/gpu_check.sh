#!/usr/bin/env bash
# The checks that need a GPU, time-boxed for a briefly lent device machine.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh checks   # build, GPU tests, compute-sanitizer, kernel bench
#   OUT=/tmp/gpu bash scripts/gpu_check.sh e2e      # end-to-end bench (bench/e2e.py --preset gpu-quick)
#
# Each phase has its own time limit and the next runs whatever happened to the last. Logs and
# results are packed into $OUT/gpu_check.tar.gz after every phase, so a cut-off run still returns
# what it did. The extension build is cached by torch, so `e2e` after `checks` skips it.
set -u
# Each tensor its own cudaMalloc, so that memcheck sees accesses past a tensor, not just past a pool.
SAN="env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer"
MODE=${1:?usage: gpu_check.sh checks|e2e}
OUT=${OUT:-/tmp/gpu_check}
WORK="$OUT/gpu_check"
mkdir -p "$WORK/logs" "$WORK/results"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

pack() { tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" gpu_check; }
phase() {  # phase NAME SECONDS COMMAND...: run under a time limit into logs/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "phase $name: rc=$rc in $((SECONDS - start))s (limit ${limit}s)" | tee -a "$WORK/logs/summary.log"
  tail -n "${TAIL_LINES:-12}" "$WORK/logs/$name.log"
  pack
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  git rev-parse HEAD; git status --short | head -20
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$WORK/logs/environment-$MODE.log" 2>&1
cat "$WORK/logs/environment-$MODE.log"
phase install 60 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
phase build_ext 180 python3 -m crossvit_fast.cli build-ext

if [ "$MODE" = checks ]; then
  phase tests 170 python3 -m pytest -q -n 8 -p no:cacheprovider --durations=8 -rs \
    tests/test_primitives.py tests/test_triton_kernels.py tests/test_backend_models.py \
    tests/test_ops.py tests/test_timm_parity.py tests/test_cuda_graphs.py tests/test_csrc_compile.py
  phase memcheck_triton 60 $SAN --tool memcheck --error-exitcode 9 \
    python3 scripts/run_each_kernel.py --backend triton
  phase memcheck_cuda 40 $SAN --tool memcheck --error-exitcode 9 \
    python3 scripts/run_each_kernel.py --backend cuda
  phase racecheck_cuda 50 $SAN --tool racecheck --error-exitcode 9 \
    python3 scripts/run_each_kernel.py --backend cuda
  phase bench_kernels "${KERNELS_LIMIT:-110}" python3 -m bench.kernels --out "$WORK/results"
else
  phase bench_e2e "${E2E_LIMIT:-270}" python3 -m bench.e2e --preset gpu-quick --out "$WORK/results"
fi
cp "$WORK"/results/*.md "$OUT"/ 2>/dev/null
cat "$WORK/logs/summary.log"
