#!/usr/bin/env bash
# The checks that need a GPU, time-boxed for a briefly lent device machine:
#
#   OUT=/tmp/gpu DEADLINE_S=500 [STEPS="ext warm tests sanitize|sanitize_triton|sanitize_cuda diagnose tune
#     model_profile profile_compiled host race graphs_ab e2e kernels"] [TESTS="pytest args"] \
#     [TESTS_K="pytest -k expression"] [E2E_ARGS="bench.e2e args"] [KERNELS_ARGS="bench.kernels args"] \
#     bash scripts/gpu_check.sh
#
# install, build the CUDA extension (ext), then the STEPS, in this order whatever order STEPS names
# them in: the GPU tests (compiled Triton, CUDA, timm parity, CUDA graphs, torch.compile with
# inductor and CUDA-graph trees) with per-test results as they finish; `diagnose` (the CUDA ops
# outside the sanitizer with a host traceback, one cross-attention call profiled, the tests named in
# FAILING rerun on their own); `tune`, `model_profile`, `host`; the batch-1 CUDA-graph A/B
# (graphs_ab); the compile race; the compiled steps' profile; compute-sanitizer memcheck on both
# backends' kernels and racecheck on the CUDA ones; the end-to-end benchmark in whatever time is
# left once KERNELS_S is set aside (skipped under 30 s); then the kernel microbenchmark (bf16).
# Each phase has its own time limit, cut to what is left before DEADLINE_S (a phase with under
# 30 s left is skipped and says so), and the next runs whatever happened to the last. Logs and
# results are written under $WORK_ROOT and packed into $OUT/gpu_check.tar.gz after every phase,
# so a cut-off run still returns what it did.
#
# Compilations are the expensive part of a lease. `warm` compiles the compile-race rows in
# parallel processes (bench.e2e --warm-compile) while the tests run, so that the race's own
# compilations are cache hits. Inductor's and Triton's caches live in $CACHE_DIR; the run packs
# them into $OUT/inductor-cache.tgz.part-* at the end, and a later run that carries them back in
# .inductor-cache/ (git-ignored) starts from them: what did not change since is not compiled again.
#
# The next session's calls for issue 18. First (one `run`, timeout_s 590): the GPU tests (what never
# ran on a GPU first) while the race's compilations warm, the compile race with every row, then
# the compiled training step's profile (about 5 + 40 + 140 + 250 + 90 s):
#   DEADLINE_S=560 STEPS="ext warm tests race profile_compiled" TESTS_S=140 RACE_S=250 \
#     PROFILE_COMPILED_ARGS="--workloads train --modes default" PROFILE_COMPILED_S=90 \
#     bash scripts/gpu_check.sh
# then at once, on the still-warm machine (it goes back after 30 s idle), what the device time
# left allows: the Triton kernels under memcheck, then the batch-1 CUDA-graph A/B:
#   DEADLINE_S=190 STEPS="sanitize_triton graphs_ab" bash scripts/gpu_check.sh
# and, in a later call, the batch-64 sweep of all variants, warmed in parallel first:
#   RACE_PRESET=variants-64 WARM_N=11 STEPS="warm race" RACE_S=300 bash scripts/gpu_check.sh
# (the fused CLS exchange, never run on a GPU before, is measured in a process of its own: a CUDA
# fault there ends that process alone)
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
# Logs and results are written outside $OUT and come back in $OUT/gpu_check.tar.gz: the device tool
# returns at most 8 files from $OUT (2 folders down), so nothing else there may compete with the
# archive, the results' Markdown and the cache parts.
WORK_ROOT=${WORK_ROOT:-/tmp/gpu_check_work}
WORK="$WORK_ROOT/gpu_check"
mkdir -p "$WORK/logs" "$WORK/results" "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
CACHE_DIR=${CACHE_DIR:-/tmp/crossvit-compile-cache}
export TORCHINDUCTOR_CACHE_DIR="$CACHE_DIR/inductor" TRITON_CACHE_DIR="$CACHE_DIR/triton"
mkdir -p "$CACHE_DIR"
if ls .inductor-cache/inductor-cache.tgz.part-* >/dev/null 2>&1; then
  cat .inductor-cache/inductor-cache.tgz.part-* | tar -xz -C "$CACHE_DIR" && echo "caches restored: $(du -sh "$CACHE_DIR")"
fi

# written beside, then renamed: a call killed while packing still returns the last whole archive
pack() { tar -czf "$OUT/.gpu_check.tar.gz.tmp" -C "$WORK_ROOT" gpu_check && mv -f "$OUT/.gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"; }
# phase NAME SECONDS COMMAND...: run under a time limit into logs/NAME.log. The limit is cut to what
# is left before DEADLINE_S (less the 20 s a killed phase may take to die and the final packing),
# and a phase with under 30 s left is skipped: the script ends before the device call's own limit,
# which would kill it unpacked.
phase() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE_S - SECONDS - 30))
  if [ "$left" -lt 30 ]; then
    echo "phase $name: skipped, ${left}s left before DEADLINE_S=$DEADLINE_S" | tee -a "$WORK/logs/summary.log"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout -s "${PHASE_SIGNAL:-TERM}" -k 20 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "phase $name: rc=$rc in $((SECONDS - start))s (limit ${limit}s)" | tee -a "$WORK/logs/summary.log"
  tail -n "${TAIL_LINES:-12}" "$WORK/logs/$name.log"
  pack
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  echo "commit ${CROSSVIT_FAST_COMMIT:-unknown} (plus the uncommitted changes of the sending checkout)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import timm; print('timm', timm.__version__)"
} > "$WORK/logs/environment.log" 2>&1
cat "$WORK/logs/environment.log"
phase install 60 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
# kernels/ and csrc/ are importable only through the installed package-dir mapping: without it
# nothing after this would measure what it says
if ! python3 -c "import crossvit_fast.kernels, crossvit_fast.csrc" >> "$WORK/logs/install.log" 2>&1; then
  echo "install failed: crossvit_fast.kernels does not import; stopping" | tee -a "$WORK/logs/summary.log"
  pack; exit 1
fi
if step ext; then
  # a build killed at its limit leaves torch's lock, on which every later load of the extension
  # (each test worker's, at start) would wait for ever (torch < 2.14). torch builds in
  # $TORCH_EXTENSIONS_DIR/<name>, else in <user cache>/torch_extensions/py<ver>_cu<ver>/<name>.
  ext_root=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}
  phase build_ext 180 python3 -m crossvit_fast.cli build-ext ||
    rm -f "$ext_root"/crossvit_fast*/lock "$ext_root"/*/crossvit_fast*/lock
fi
RACE_PRESET=${RACE_PRESET:-compile-race}
WARM_N=${WARM_N:-6}   # the race preset's compiled rows (compile-race 6, compile-quick 4): one process each
# The warming processes may run until the tests end and WARM_GRACE_S after: what they have not
# compiled by then the race compiles itself (within its compile budget), rather than waiting.
WARM_S=${WARM_S:-$((${TESTS_S:-150} + ${WARM_GRACE_S:-60}))}
if step warm; then
  for k in $(seq 0 $((WARM_N - 1))); do
    timeout -k 10 "$WARM_S" python3 -m bench.e2e --preset "$RACE_PRESET" --warm-compile "$k/$WARM_N" \
      > "$WORK/logs/warm_$k.log" 2>&1 &
  done
fi

# What has never run on a GPU first (xdist hands tests out about in this order, so a cut phase
# leaves the last ones out). test_csrc_compile's nvcc build for three archs needs no GPU (CI runs
# it) and takes minutes: only its GPU case runs here.
GPU_TESTS="tests/test_compile.py tests/test_attention_maps.py tests/test_cuda_graphs.py tests/test_branch_streams.py
  tests/test_cls_exchange.py tests/test_launch_device.py
  tests/test_timm_parity.py::test_gpu_fp32_and_bf16_autocast_match_timm
  tests/test_primitives.py tests/test_triton_kernels.py tests/test_backend_models.py tests/test_ops.py
  tests/test_csrc_compile.py --deselect tests/test_csrc_compile.py::test_csrc_compiles_for_sm75_sm80_and_sm90"
# One CPU thread per xdist worker: the timm-parity cases build models on the CPU.
# SIGINT at the limit: pytest then still prints its summary with the failures' tracebacks (a
# SIGTERM cut run 1's before it); --timeout: one stuck test fails instead of holding the phase
step tests && PHASE_SIGNAL=INT phase tests "${TESTS_S:-150}" env OMP_NUM_THREADS=1 python3 -m pytest -v -n 14 \
  -p no:cacheprovider --timeout=90 --tb=short -rfE --junitxml="$WORK/logs/tests.xml" ${TESTS:-$GPU_TESTS} \
  ${TESTS_K:+-k "$TESTS_K"}
TAIL_LINES=4
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
if step warm; then   # the warming processes are the shell's only background jobs (each under WARM_S)
  start=$SECONDS; wait
  echo "phase warm: done $((SECONDS - start))s after the phases before it (limit ${WARM_S}s each)" | tee -a "$WORK/logs/summary.log"
  grep -h "warmed\|Error" "$WORK"/logs/warm_*.log | tail -n 12
fi
# CUDA-graph replays at batch 1 (crossvit_tiny_240, fp32 and bf16): timm, crossvit_fast, and
# crossvit_fast with its CLS projections fused, its CLS exchanges fused, its branches on two
# streams, or two of these, under the capture (the A/B that decides their defaults). Before the
# race, once the warming processes are done (nothing else on the GPU), and in two processes: the
# fused CLS exchange, never run on a GPU before, apart, since a CUDA fault ends its process.
if step graphs_ab; then
  phase graphs_ab "${GRAPHS_AB_S:-60}" python3 scripts/graphs_ab.py --out "$WORK/results" --skip exchange \
    ${GRAPHS_AB_ARGS:-}
  phase graphs_ab_exchange "${GRAPHS_AB_EXCHANGE_S:-45}" python3 scripts/graphs_ab.py \
    --out "$WORK/results/exchange" --only exchange ${GRAPHS_AB_ARGS:-}
fi
# issue 11's end-to-end rows, each against timm run the same way (compiled, graphed); compiled rows
# are left out once their compilations took RACE_S - 100 s (a warming process cut off leaves
# cold caches), so that the rest of the race still runs (its six compilations take about 350 s
# on an H100 without warm caches)
RACE_S=${RACE_S:-420}
step race && phase bench_race "$RACE_S" python3 -m bench.e2e --preset "$RACE_PRESET" --out "$WORK/results" \
  --compile-budget-s $((RACE_S - 100))
# the compiled steps of both models: graphs, breaks, recompiles, CUDA-graph skips, wall vs kernel
# time, inductor's code (into results/compiled/)
# (each of its 8 rows compiles a model: limit it with PROFILE_COMPILED_ARGS="--workloads train --modes default")
step profile_compiled && phase profile_compiled "${PROFILE_COMPILED_S:-240}" python3 scripts/profile_compiled.py \
  --out "$WORK/results/compiled" ${PROFILE_COMPILED_ARGS:-}
# sanitize: both backends; sanitize_triton / sanitize_cuda: one (after the timed steps: the tests
# have run every kernel against its reference by then, and what the deadline leaves out waits)
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
KERNELS_S=${KERNELS_S:-90}
E2E_S=$((DEADLINE_S - SECONDS - 15 - $(step kernels && echo "$KERNELS_S" || echo 0)))
step e2e && [ "$E2E_S" -ge 30 ] && phase bench_e2e "$E2E_S" python3 -m bench.e2e \
  ${E2E_ARGS:---preset gpu-quick --compile-budget-s 100} --out "$WORK/results"
step kernels && phase bench_kernels "$KERNELS_S" python3 -m bench.kernels --dtypes bf16 \
  ${KERNELS_ARGS:-} --out "$WORK/results"
cp "$WORK"/results/e2e*.md "$OUT"/ 2>/dev/null
# The device tool returns at most 8 files and 64 MiB from $OUT: the caches come back only where
# they pack into 45 MiB (3 parts), beside the logs' archive and the results' Markdown.
# Skipped where the caches are far past that (gzip would only spend the call's last seconds) or
# the deadline is near.
cache_mb=$(du -sm "$CACHE_DIR" 2>/dev/null | cut -f1)
if [ "${PACK_CACHE:-1}" = 1 ] && { [ "${cache_mb:-0}" -gt 200 ] || [ $((DEADLINE_S - SECONDS)) -lt 30 ]; }; then
  echo "caches not packed: ${cache_mb} MiB, $((DEADLINE_S - SECONDS))s before DEADLINE_S"
elif [ "${PACK_CACHE:-1}" = 1 ]; then
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
pack   # the summary and anything written since the last phase
cat "$WORK/logs/summary.log"
