#!/usr/bin/env bash
# Both benchmark studies' GPU defaults, into ${OUT:-bench/results}, then their Markdown tables.
# Each study runs under its own time limit and the next one runs whatever happened to the last;
# a study stopped by its limit still writes what it measured (SIGTERM), SIGKILL 20 s later.
# About 5 minutes on an H100: kernels under 2, e2e about 3. Exit status: 1 if any study failed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
KERNELS_LIMIT="${KERNELS_LIMIT:-150}"
E2E_LIMIT="${E2E_LIMIT:-240}"
mkdir -p "$OUT"
status=0

run_study() {  # run_study LIMIT_S MODULE ARGS...
    local limit=$1 module=$2
    shift 2
    echo "=== python -m $module $* --out $OUT  (limit ${limit} s)"
    local start=$SECONDS
    timeout -k 20 "$limit" python -m "$module" "$@" --out "$OUT"
    local rc=$?
    echo "=== $module: exit $rc after $((SECONDS - start)) s$([ $rc -eq 124 ] && echo ' (time limit: results are partial)')"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true
# The cuda backend builds its extension on first use (nvcc, minutes uncached): build it here, outside
# the kernels study's limit; if that fails, the study times the other backends only.
echo "=== building the CUDA extension (limit ${BUILD_LIMIT:-300} s)"
backends_arg=()
if ! timeout -k 20 "${BUILD_LIMIT:-300}" python -m crossvit_fast.cli build-ext; then
    echo "=== CUDA extension build failed: bench.kernels runs triton,torch only"
    backends_arg=(--backends triton,torch)
    status=1
fi
run_study "$KERNELS_LIMIT" bench.kernels ${backends_arg[@]+"${backends_arg[@]}"}
run_study "$E2E_LIMIT" bench.e2e --preset gpu-quick

for md in "$OUT"/kernels-*.md "$OUT"/e2e-*.md; do
    case "$md" in *-smoke-*) continue ;; esac
    [ -f "$md" ] && { echo; echo "===== $md"; cat "$md"; }
done
exit $status
