#!/usr/bin/env bash
# The GPU half of the distributed-training checks (issue 14), on one GPU, about 5 minutes:
#   1. peak memory of a training step with and without activation checkpointing
#      (max_memory_allocated; crossvit_18_240 batch 128, crossvit_18_dagger_408 batch 64, bf16)
#   2. DDP, FSDP2 and distributed checkpoints on NCCL (one process), and activation
#      checkpointing through the compiled kernels (tests/test_distributed.py, test_checkpointing.py)
#   3. the example under torchrun on NCCL: 10 steps, then resumed to 20
# Usage: OUT=/tmp/gpu-training bash scripts/gpu_training_check.sh   (results and logs in $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-training}
mkdir -p "$OUT"
export CROSSVIT_FAST_COMMIT=${CROSSVIT_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
status=0

step() {   # step NAME TIMEOUT_S COMMAND...: run it, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

step memory 240 python3 scripts/memory_checkpointing.py --device cuda --json "$OUT/memory-checkpointing.json"
step tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/test_checkpointing.py
EXAMPLE=(-m crossvit_fast.examples.train_ddp --model crossvit_18_240 --batch-size 64 --amp
         --grad-checkpointing --save-every 10 --checkpoint "$OUT/train_ddp.pt")
step example 120 torchrun --standalone --nproc-per-node 1 "${EXAMPLE[@]}" --steps 10
step example_resumed 120 torchrun --standalone --nproc-per-node 1 "${EXAMPLE[@]}" --steps 20 --resume
exit $status
