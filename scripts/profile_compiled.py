"""What a compiled training step does: crossvit_fast against timm, both under torch.compile (GPU).

For crossvit_18_240 under bf16 autocast, a training step at batch 128 (forward, cross-entropy,
backward, AdamW) and an inference forward at batch 256, each compiled in the default mode and
with ``mode="reduce-overhead"``, per model:

- the graphs dynamo made, its graph breaks and recompiles, and the CUDA-graph skips with their
  reasons (reduce-overhead);
- the wall time per step back to back (10 steps, one synchronize, median of 3 rounds) against
  the GPU kernel time of a step (profiler): where the wall time is well above the kernel time,
  the host sets the pace;
- the kernels with the most GPU time, and how many tensors the forward saves for the backward;
- inductor's generated code, written to ``<out>/<model>-<workload>-<mode>.py``: whether the
  Triton kernels are launched from it and what runs around them.

    python scripts/profile_compiled.py [--out DIR] [--workloads train,infer] [--modes default,reduce-overhead]

Recompiles, graph breaks and CUDA-graph skips are also logged, with their reasons, to stderr.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import crossvit_fast
from crossvit_fast.benchmarking import back_to_back_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout, for bench/
from bench.e2e import load_timm  # noqa: E402

BATCH = {"train": 128, "infer": 256}


def step_fn(model, workload):
    x = torch.randn(BATCH[workload], 3, 240, 240, device="cuda")
    labels = torch.randint(0, 1000, (BATCH[workload],), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def infer():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    def train():
        torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
    return train if workload == "train" else infer


def kernels(step, top=12):
    """GPU ms of one step and its ``top`` kernels by GPU time."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / 1e3
    return total, [(e.key[:90], e.count, round(e.self_device_time_total / 1e3, 3)) for e in events[:top]]


def saved_for_backward(model, workload):
    """How many tensors (and MB) autograd keeps from the compiled forward for the backward."""
    if workload != "train":
        return None
    count, nbytes = 0, 0

    def pack(t):
        nonlocal count, nbytes
        count += 1
        nbytes += t.numel() * t.element_size()
        return t
    x = torch.randn(BATCH[workload], 3, 240, 240, device="cuda")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
    return dict(tensors=count, MB=round(nbytes / 2 ** 20, 1))


def dynamo_stats() -> dict:
    """Graphs, graph breaks, recompiles (with the guards that failed) and CUDA-graph skips since
    the last ``torch._dynamo.reset()``. Dynamo's counters have no "recompiles" entry (torch 2.11
    and 2.13): recompiles are counted from its compiles per frame, their reasons from its record
    of guard failures."""
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters, guard_failures
    compiles = getattr(convert_frame, "FRAME_COMPILE_COUNTER", {})
    return dict(graphs=counters["stats"]["unique_graphs"],
                graph_breaks=dict(counters["graph_break"]),
                recompiles=sum(n - 1 for n in compiles.values() if isinstance(n, int) and n > 1),
                recompile_reasons=[reason[:200] for failures in guard_failures.values()
                                   for reason in failures][:20],
                cudagraph_skips=counters["inductor"]["cudagraph_skips"])   # reasons: perf_hints log


def profile_one(name, build, workload, mode, out):
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    counters.clear()
    base = build().cuda().train(workload == "train")
    options = {} if mode == "default" else {"mode": mode}
    model = torch.compile(base, **options)
    step = step_fn(model, workload)
    start = time.perf_counter()
    _, code = run_and_get_code(step)
    compile_s = time.perf_counter() - start
    for _ in range(3):
        step()
    wall = statistics.median(back_to_back_time(step, "cuda", steps=10, rounds=3, warmup=0)) * 1e3
    gpu, top = kernels(step)
    stem = f"{name}-{workload}-{mode}"
    (out / f"{stem}.py").write_text("\n\n# ---- next graph ----\n\n".join(code))
    return dict(model=name, workload=workload, mode=mode, batch=BATCH[workload], compile_s=round(compile_s, 1),
                wall_ms=round(wall, 2), gpu_ms=round(gpu, 2), **dynamo_stats(),
                triton_kernels_in_code=sum(c.count("_attn_pool_") for c in code),
                opaque_op_calls=sum(c.count("torch.ops.crossvit_fast") for c in code),
                saved_for_backward=saved_for_backward(model, workload), top_kernels=top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/profile_compiled")
    parser.add_argument("--workloads", default="train,infer")
    parser.add_argument("--modes", default="default,reduce-overhead")
    parser.add_argument("--models", default="fast,timm")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch._logging.set_logs(perf_hints=True, recompiles=True, graph_breaks=True)  # to stderr: the why
    timm, reason = load_timm()
    builders = {"fast": lambda: crossvit_fast.create_model("crossvit_18_240"),
                "timm": (lambda: timm.create_model("crossvit_18_240")) if timm else None}
    rows = []
    for workload in args.workloads.split(","):
        for mode in args.modes.split(","):
            for name in args.models.split(","):
                if builders[name] is None:
                    print(f"{name}: {reason}")
                    continue
                try:
                    row = profile_one(name, builders[name], workload, mode, out)
                except Exception as err:  # noqa: BLE001 - one failing row must not end the study
                    row = dict(model=name, workload=workload, mode=mode, failed=f"{type(err).__name__}: {err}"[:400])
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / "profile_compiled.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
