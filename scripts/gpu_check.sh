#!/usr/bin/env bash
# The checks that need a GPU, time-boxed for a briefly lent device machine:
#
#   OUT=/tmp/gpu DEADLINE_S=500 [STEPS="ext warm tests sanitize|sanitize_triton|sanitize_cuda diagnose tune
#     model_profile profile_compiled host race graphs_ab e2e kernels"] [TESTS="pytest args"] \
#     [TESTS_K="pytest -k expression"] [E2E_ARGS="bench.e2e args"] [KERNELS_ARGS="bench.kernels args"] \
#     bash scripts/gpu_check.sh
#
# install, build the CUDA extension (ext), then the STEPS: the GPU tests (compiled Triton, CUDA, timm parity, CUDA
# graphs, torch.compile with inductor and CUDA-graph trees) with per-test results as they finish; compute-sanitizer memcheck on both backends' kernels and
# racecheck on the CUDA ones; the end-to-end benchmark in whatever time is left before DEADLINE_S
# once KERNELS_S is set aside (skipped under 30 s); then the kernel microbenchmark (bf16). `diagnose` runs the CUDA ops
# outside the sanitizer with a host traceback, profiles one cross-attention call and reruns the
# tests named in FAILING on their own, for their tracebacks. Each phase has its own time limit and the next runs
# whatever happened to the last. Logs and results are packed into $OUT/gpu_check.tar.gz after
# every phase, so a cut-off run still returns what it did.
#
# Compilations are the expensive part of a lease. `warm` compiles the compile-race rows in
# parallel processes (bench.e2e --warm-compile) while the tests and sanitizers run, so that the
# race's own compilations are cache hits. Inductor's and Triton's caches live in $CACHE_DIR; the
# run packs them into $OUT/inductor-cache.tgz.part-* at the end, and a later run that carries them
# back in .inductor-cache/ (git-ignored) starts from them: what did not change since is not
# compiled again.
#
# The next session's call for issue 18 (about 9 minutes on an H200): the compile race with every
# row, then the batch-64 sweep of all variants, each warmed in parallel first:
#   STEPS="ext warm tests sanitize_triton race graphs_ab profile_compiled" TESTS_S=120 RACE_S=240 \
#     PROFILE_COMPILED_ARGS="--workloads train --modes default" PROFILE_COMPILED_S=90 bash scripts/gpu_check.sh
#   RACE_PRESET=variants-64 WARM_N=11 STEPS="warm race" RACE_S=300 bash scripts/gpu_check.sh
# (the first call may end before graphs_ab and profile_compiled: H200 run 1 ended after its race;
# then, on the still-warm machine: STEPS="graphs_ab profile_compiled" GRAPHS_AB_S=90 ...; where
# the fused CLS exchange, never run on a GPU before, faults, GRAPHS_AB_ARGS="--skip exchange")
# Issue 19's kernel timing (about 4 minutes; the channel-tiled token pass has never run on a GPU, so
# its tests go first): each fused op at crossvit_18_240's shapes, batch 32 and 256, bf16, on the
# Triton and CUDA backends against eager and compiled naive, with fractions of copy bandwidth:
#   STEPS="ext tests kernels" TESTS="tests/test_triton_kernels.py tests/test_primitives.py
#     tests/test_attention_maps.py" TESTS_S=90 KERNELS_S=240 DEADLINE_S=420 \
#     KERNELS_ARGS="--models crossvit_18_240 --batch-sizes 32,256 --compile-budget-s 150" bash scripts/gpu_check.sh
set -u
# Each tensor its own cudaMalloc, so that memcheck sees accesses past a tensor, not just past a pool.
SAN="env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer"
DEADLINE_S=${DEADLINE_S:-500}
STEPS=${STEPS:-ext tests sanitize kernels e2e}
step() { [[ " $STEPS " == *" $1 "* ]]; }
OUT=${OUT:-/tmp/gpu_check}
WORK="$OUT/gpu_check"
mkdir -p "$WORK/logs" "$WORK/results"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
CACHE_DIR=${CACHE_DIR:-/tmp/crossvit-compile-cache}
export TORCHINDUCTOR_CACHE_DIR="$CACHE_DIR/inductor" TRITON_CACHE_DIR="$CACHE_DIR/triton"
mkdir -p "$CACHE_DIR"
if ls .inductor-cache/inductor-cache.tgz.part-* >/dev/null 2>&1; then
  cat .inductor-cache/inductor-cache.tgz.part-* | tar -xz -C "$CACHE_DIR" && echo "caches restored: $(du -sh "$CACHE_DIR")"
fi

pack() { tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" gpu_check; }
phase() {  # phase NAME SECONDS COMMAND...: run under a time limit into logs/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout -s "${PHASE_SIGNAL:-TERM}" -k 20 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "phase $name: rc=$rc in $((SECONDS - start))s (limit ${limit}s)" | tee -a "$WORK/logs/summary.log"
  tail -n "${TAIL_LINES:-12}" "$WORK/logs/$name.log"
  pack
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  echo "commit ${CROSSVIT_FAST_COMMIT:-unknown} (plus the uncommitted changes of the sending checkout)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$WORK/logs/environment.log" 2>&1
cat "$WORK/logs/environment.log"
phase install 60 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
step ext && phase build_ext 180 python3 -m crossvit_fast.cli build-ext
RACE_PRESET=${RACE_PRESET:-compile-race}
WARM_N=${WARM_N:-6}   # the race preset's compiled rows (compile-race 6, compile-quick 4): one process each
if step warm; then
  for k in $(seq 0 $((WARM_N - 1))); do
    timeout -k 10 "${WARM_S:-280}" python3 -m bench.e2e --preset "$RACE_PRESET" --warm-compile "$k/$WARM_N" \
      > "$WORK/logs/warm_$k.log" 2>&1 &
  done
fi

GPU_TESTS="tests/test_primitives.py tests/test_triton_kernels.py tests/test_cls_exchange.py tests/test_attention_maps.py
  tests/test_backend_models.py tests/test_ops.py tests/test_cuda_graphs.py tests/test_branch_streams.py
  tests/test_launch_device.py
  tests/test_csrc_compile.py tests/test_compile.py
  tests/test_timm_parity.py::test_gpu_fp32_and_bf16_autocast_match_timm"
# One CPU thread per xdist worker: the timm-parity cases build models on the CPU.
# SIGINT at the limit: pytest then still prints its summary with the failures' tracebacks (a
# SIGTERM cut run 1's before it); --timeout: one stuck test fails instead of holding the phase
step tests && PHASE_SIGNAL=INT phase tests "${TESTS_S:-150}" env OMP_NUM_THREADS=1 python3 -m pytest -v -n 14 \
  -p no:cacheprovider --timeout=90 --tb=short -rfE --junitxml="$WORK/logs/tests.xml" ${TESTS:-$GPU_TESTS} \
  ${TESTS_K:+-k "$TESTS_K"}
TAIL_LINES=4
# sanitize: both backends; sanitize_triton / sanitize_cuda: one
if step sanitize || step sanitize_triton; then
  # Compile the Triton kernels outside the sanitizer first (slow under it); memcheck then loads them
  phase warm_triton 60 python3 scripts/run_each_kernel.py --backend triton
  phase memcheck_triton 90 $SAN --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 scripts/run_each_kernel.py --backend triton
fi
if step sanitize || step sanitize_cuda; then
  phase memcheck_cuda 30 $SAN --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 scripts/run_each_kernel.py --backend cuda
  phase racecheck_cuda 40 $SAN --tool racecheck --error-exitcode 9 --print-limit 20 \
    python3 scripts/run_each_kernel.py --backend cuda
fi
if step diagnose; then   # a plain run (host traceback on a crash) and the op's time breakdown
  phase failing 40 python3 -m pytest -q -p no:cacheprovider --tb=short ${FAILING:-tests/test_triton_kernels.py}
  phase run_cuda 30 python3 -X faulthandler scripts/run_each_kernel.py --backend cuda
  phase profile 40 python3 scripts/profile_cross_attention.py
fi
# the token-pass configuration sweep (BLOCK_N, warps, pipeline stages, splits)
step tune && phase tune "${TUNE_S:-180}" python3 scripts/tune_attn_pool.py sweep
# GPU kernel time of whole-model steps, fast against timm, and the kernels that take it
step model_profile && phase model_profile "${MODEL_PROFILE_S:-90}" python3 scripts/profile_model.py
# host time per eager call of each fused op against timm's ATen ops (batch 1)
step host && phase host_cost "${HOST_S:-60}" python3 scripts/host_cost.py --out "$WORK/results"
if step warm; then   # the warming processes are the shell's only background jobs
  start=$SECONDS; wait
  echo "phase warm: done $((SECONDS - start))s after the phases before it" | tee -a "$WORK/logs/summary.log"
  grep -h "warmed\|Error" "$WORK"/logs/warm_*.log | tail -n 12
fi
# issue 11's end-to-end rows, each against timm run the same way (compiled, graphed)
# (its six compilations take about 350 s on an H100 without warm caches)
step race && phase bench_race "${RACE_S:-420}" python3 -m bench.e2e --preset "$RACE_PRESET" --out "$WORK/results"
# CUDA-graph replays at batch 1 (crossvit_tiny_240, fp32 and bf16): timm, crossvit_fast, and
# crossvit_fast with its CLS projections fused, its branches on two streams, or both, under the
# capture (the A/B that decides their defaults)
step graphs_ab && phase graphs_ab "${GRAPHS_AB_S:-90}" python3 scripts/graphs_ab.py --out "$WORK/results" \
  ${GRAPHS_AB_ARGS:-}
# the compiled steps of both models: graphs, breaks, recompiles, CUDA-graph skips, wall vs kernel
# time, inductor's code (into results/compiled/)
# (each of its 8 rows compiles a model: limit it with PROFILE_COMPILED_ARGS="--workloads train --modes default")
step profile_compiled && phase profile_compiled "${PROFILE_COMPILED_S:-240}" python3 scripts/profile_compiled.py \
  --out "$WORK/results/compiled" ${PROFILE_COMPILED_ARGS:-}
KERNELS_S=${KERNELS_S:-90}
E2E_S=$((DEADLINE_S - SECONDS - 15 - $(step kernels && echo "$KERNELS_S" || echo 0)))
step e2e && [ "$E2E_S" -ge 30 ] && phase bench_e2e "$E2E_S" python3 -m bench.e2e \
  ${E2E_ARGS:---preset gpu-quick --compile-budget-s 100} --out "$WORK/results"
step kernels && phase bench_kernels "$KERNELS_S" python3 -m bench.kernels --dtypes bf16 \
  ${KERNELS_ARGS:-} --out "$WORK/results"
cp "$WORK"/results/e2e*.md "$OUT"/ 2>/dev/null
# The device tool returns at most 8 files and 64 MiB from $OUT: the caches come back only where
# they pack into 45 MiB (3 parts), beside the logs' archive and the results' Markdown.
if [ "${PACK_CACHE:-1}" = 1 ]; then
  rm -f "$OUT"/inductor-cache.tgz.part-*
  tar -cz -C "$CACHE_DIR" . > /tmp/inductor-cache.tgz
  size=$(stat -c %s /tmp/inductor-cache.tgz)
  if [ "$size" -le $((45 * 1024 * 1024)) ]; then
    split -b 15M /tmp/inductor-cache.tgz "$OUT/inductor-cache.tgz.part-"
    echo "caches packed: $((size / 1024 / 1024)) MiB"
  else
    echo "caches not packed: $((size / 1024 / 1024)) MiB is past what the device tool returns"
  fi
  rm -f /tmp/inductor-cache.tgz
fi
cat "$WORK/logs/summary.log"
