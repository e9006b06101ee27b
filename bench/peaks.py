"""The device's copy bandwidth and matmul throughput, measured in the run that uses them.

Roofline fractions divide an op's achieved GB/s and TFLOP/s by these, so they come from the same
process, device, clocks and library versions as the op timings, not from a datasheet.
"""
from __future__ import annotations

import torch

from crossvit_fast.benchmarking import summarize, time_fn


def copy_bandwidth(device: torch.device, n_bytes: int, warmup: int, iters: int) -> dict:
    """GB/s of ``dst.copy_(src)`` on ``device`` for two buffers of ``n_bytes`` each.

    A copy reads and writes every byte, so it moves ``2 · n_bytes``.
    """
    src = torch.rand(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    stats = summarize(time_fn(lambda: dst.copy_(src), device, warmup=warmup, iters=iters))
    moved = 2 * src.numel() * src.element_size()
    return dict(bytes=moved, GBps=moved / stats["median_s"] / 1e9, **stats)


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    """TFLOP/s of an ``n × n × n`` matmul in ``dtype`` on ``device`` (``2n³`` FLOPs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    stats = summarize(time_fn(lambda: torch.matmul(a, b, out=out), device, warmup=warmup, iters=iters))
    flops = 2 * n ** 3
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), flops=flops,
                TFLOPs=flops / stats["median_s"] / 1e12, **stats)
