"""Where a whole-model forward spends its host (Python) time, on a GPU.

Runs crossvit_fast's crossvit_18_240 inference at batch 256 under bf16 autocast, reports the
wall time per step against the GPU kernel time, and prints cProfile's functions with the most
own time: the host cost that the GPU cannot hide when it is the longer of the two.

    python scripts/profile_host.py [variant] [batch]
"""
import cProfile
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import crossvit_fast


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "crossvit_18_240"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    model = crossvit_fast.create_model(variant).cuda().eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], device="cuda")

    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    host = (time.perf_counter() - t0) / 5
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"{variant} B={batch} bf16 autocast inference: wall {wall * 1e3:.2f} ms/step, host "
          f"{host * 1e3:.2f} ms/step (enqueue), GPU kernels {gpu:.2f} ms/step")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
