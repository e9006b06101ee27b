"""Where the time of one fused cross-attention call goes, per backend (GPU).

Runs ``ops.cls_cross_attention`` forward at crossvit_18_240's larger cross-attention shape
(B=256, N=196, C=448, 7 heads, bf16) under ``torch.profiler`` and prints the CUDA kernels and the
wall time per call, so launch/CPU overhead can be told apart from kernel time.

    python scripts/profile_cross_attention.py
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from crossvit_fast import ops

B, N, C, H = 256, 196, 448, 7


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    tokens = torch.randn(B, N + 1, C, device=dev, dtype=dt)
    cls = torch.randn(B, 1, C, device=dev, dtype=dt)
    nw, nb = torch.ones(C, device=dev), torch.zeros(C, device=dev)
    w = [torch.randn(C, C, device=dev) / C ** 0.5 for _ in range(4)]
    b = [torch.zeros(C, device=dev) for _ in range(4)]
    for backend in ("triton", "cuda", "torch"):
        def call():
            return ops.cls_cross_attention(cls, tokens[:, 1:], nw, nb, w[0], b[0], w[1], b[1],
                                           w[2], b[2], w[3], b[3], H, (C // H) ** -0.5,
                                           backend=backend)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) / 20 * 1e6
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        kernels = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 10
        print(f"== {backend}: wall {wall_us:.0f} us/call, CUDA kernels {kernels:.0f} us/call")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
