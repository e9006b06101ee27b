"""Timing and environment capture shared by ``crossvit-fast bench`` and the bench/ harness.

Times are medians over warmed-up, synchronized runs: CUDA events on a GPU, ``perf_counter``
on the CPU.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

# The dtypes of ``crossvit-fast`` and the bench/ harness, by their command-line names.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3,
            iters: int = 10, min_seconds: float = 0.0) -> List[float]:
    """Seconds per call of ``fn`` over ``iters`` calls (more until ``min_seconds`` have passed)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start_all < min_seconds:
        if device.type == "cuda":
            # on `device`'s stream, which need not be the current device's
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def back_to_back_time(fn: Callable[[], object], device: torch.device | str, steps: int = 10,
                      rounds: int = 3, warmup: int = 3) -> List[float]:
    """Seconds per call of ``fn`` run ``steps`` times back to back with one synchronize at the
    end, once per round: the throughput a training loop sees, where the host may queue the next
    step while the GPU still runs the last (unlike :func:`time_fn`, which waits for each call)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / steps)
    return times


def interleaved_rounds(fns: Dict[str, Callable[[], object]], device: torch.device | str,
                       steps: int = 10, rounds: int = 6) -> Dict[str, List[float]]:
    """Seconds per call of each of ``fns`` (by name) in every round: ``steps`` calls back to back
    with one synchronize, the rounds of all of them interleaved, so that a drift in the host's
    or the GPU's speed (large on a lent device machine) falls on each alike."""
    device = torch.device(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def interleaved_back_to_back(fns: Dict[str, Callable[[], object]], device: torch.device | str,
                             steps: int = 10, rounds: int = 6) -> Dict[str, float]:
    """The median of each of ``fns``' :func:`interleaved_rounds`."""
    return {name: statistics.median(t)
            for name, t in interleaved_rounds(fns, device, steps, rounds).items()}


def kernel_time(fn: Callable[[], object], device: torch.device | str, iters: int = 10) -> Optional[float]:
    """GPU seconds per call of ``fn``: the device time of every kernel (and copy) it launches,
    from the profiler, summed over ``iters`` calls after one warm-up call; None off CUDA.

    Unlike :func:`time_fn`, which times a synchronized call and so counts the host time before
    the GPU gets work, this is what the GPU spends; the two differ most for small, host-bound
    calls.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1e6


def load_profiler(device: torch.device | str) -> None:
    """Runs one empty profiler session on ``device`` (CUDA), for a study that times some calls
    before profiling others: the profiler's CUDA tracing stays loaded after a session (kineto
    leaves CUPTI attached), which slows later host-bound calls; loaded first, it falls on every
    timed call alike."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]):
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)


def summarize(times: List[float]) -> Dict[str, float]:
    """Median and spread (min, 10th/90th percentile, max) of a list of seconds."""
    ordered = sorted(times)
    pct = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return dict(median_s=statistics.median(ordered), min_s=ordered[0], p10_s=pct(0.1),
                p90_s=pct(0.9), max_s=ordered[-1], runs=len(ordered))


def git_commit() -> str:
    """The commit of the checkout this package runs from, or 'unknown'.

    ``CROSSVIT_FAST_COMMIT`` names it where the code runs from a copy without git history
    (e.g. a working tree sent to a GPU machine).
    """
    if os.environ.get("CROSSVIT_FAST_COMMIT"):
        return os.environ["CROSSVIT_FAST_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def host_cpu() -> str:
    """The host's processor model (Linux's /proc/cpuinfo, else what platform says) and core count:
    the host sets the pace of small or eager steps, on a GPU machine too."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def environment(device: torch.device | str) -> Dict[str, str]:
    """Device name, host CPU, driver, library versions and commit, for result files."""
    device = torch.device(device)
    env = {"device": "cpu: " + (platform.processor() or platform.machine()), "host": host_cpu(),
           "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown"
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    return env


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes of tensor memory allocated on ``device`` while ``fn()`` runs, above what was
    allocated when it started (activations, gradients, temporaries; not the tensors that were
    there before, such as the parameters).

    On CUDA that is the caching allocator's ``max_memory_allocated``. The CPU allocator keeps
    no such statistics (and ``tracemalloc`` does not see tensor memory), so there the
    profiler's allocation events (``profile_memory=True``: the size of every allocation and
    free of a CPU tensor) are summed in time order and their highest running total is taken.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak
