"""Where a whole-model step spends its GPU time: crossvit_fast against timm (GPU only).

Profiles crossvit_18_240 under bf16 autocast, an inference forward at batch 256 and a training
step (forward, cross-entropy, backward, SGD) at batch 128, and prints per model the wall time
per step (median of rounds interleaved across the models), the summed CUDA kernel time and the kernels that take the most of it. "fast, norms
fused" (training only: every inference norm here is over the threshold) runs every block norm
through the fused op (``layers.always_fuse_norms``): the A/B of ``layers.FUSED_NORM_MIN_ELEMENTS``.

    python scripts/profile_model.py [variant]
"""
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import crossvit_fast
from crossvit_fast import layers
from crossvit_fast.benchmarking import interleaved_back_to_back

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout, for bench/
from bench.e2e import load_timm  # noqa: E402


def step_fn(model, mode, batch):
    x = torch.randn(batch, 3, 240, 240, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    def train():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
    return infer if mode == "infer" else train


def with_context(fn, context):
    def run():
        with context():
            fn()
    return run


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "crossvit_18_240"
    timm, reason = load_timm()
    fast = lambda: crossvit_fast.create_model(variant)  # noqa: E731
    builders = {"fast": (fast, contextlib.nullcontext), "fast, norms fused": (fast, layers.always_fuse_norms)}
    if timm is not None:
        builders["timm"] = (lambda: timm.create_model(variant), contextlib.nullcontext)
    else:
        print("timm left out:", reason)
    for mode, batch in (("infer", 256), ("train", 128)):
        steps = {}
        for name, (build, context) in builders.items():
            if mode == "infer" and name == "fast, norms fused":
                continue   # at these sizes every inference norm is over the threshold
            model = build().cuda().train(mode == "train")
            steps[name] = with_context(step_fn(model, mode, batch), context)
            for _ in range(3):
                steps[name]()
        walls = interleaved_back_to_back(steps, "cuda", steps=4, rounds=6)
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            total = sum(e.self_device_time_total for e in events) / 2
            print(f"== {variant} {mode} B={batch} {name}: wall {walls[name] * 1e3:.2f} ms/step "
                  f"(median), CUDA kernels {total / 1e3:.2f} ms/step")
            print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))
        del steps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
