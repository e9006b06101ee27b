"""Peak memory and time of a training step with and without activation checkpointing.

    python scripts/memory_checkpointing.py --device cuda --json bench/results/memory-checkpointing-h200.json
    python scripts/memory_checkpointing.py --device cpu

A step is forward, backward (cross-entropy) and an AdamW update of a freshly built variant
(1000 classes) on random images, after one warm-up step that creates the optimizer state.
Reported per step: the memory resident before it (parameters and AdamW state), the peak it
allocates above that (activations, gradients, temporaries; ``crossvit_fast.benchmarking.
peak_memory``: CUDA's ``max_memory_allocated`` on a GPU, the profiler's allocation events on
the CPU), on CUDA the device's ``max_memory_allocated`` itself, and the median step time.
Defaults: on CUDA crossvit_18_240 at batch 128 and crossvit_18_dagger_408 at batch 64 under
bf16 autocast; on the CPU crossvit_tiny_240 at batch 16 and crossvit_18_240 at batch 4 in fp32.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Dict, List

import torch
import torch.nn.functional as F

import crossvit_fast
from crossvit_fast.benchmarking import environment, peak_memory, time_fn

DEFAULT_RUNS = {"cuda": "crossvit_18_240:128,crossvit_18_dagger_408:64",
                "cpu": "crossvit_tiny_240:16,crossvit_18_240:4"}
MIB = 2 ** 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", help="comma-separated model:batch (default: per device, see above)")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="bf16: autocast (default on CUDA); fp32 (default on the CPU)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters and the optimizer's state tensors."""
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *state])


def measure(name: str, batch: int, checkpointing: bool, device: torch.device, bf16: bool,
            iters: int) -> Dict[str, object]:
    """One configuration's row: memory in MiB, median step time in ms."""
    torch.manual_seed(0)
    model = crossvit_fast.create_model(name).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    res = model.pretrained_cfg["input_size"][-1]
    images = torch.randn(batch, 3, res, res, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row = dict(model=name, batch=batch, grad_checkpointing=checkpointing)
    try:
        step()                                   # creates AdamW's state
        row["resident_mib"] = resident_bytes(model, optimizer) / MIB
        row["step_peak_mib"] = peak_memory(step, device) / MIB
        if device.type == "cuda":
            row["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        row["step_ms"] = statistics.median(time_fn(step, device, warmup=0, iters=iters)) * 1e3
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: List[Dict[str, object]]) -> str:
    """The rows as a Markdown table."""
    head = "| model | batch | checkpointing | resident MiB | step peak MiB | max_memory_allocated MiB | step ms |"
    lines = [head, "|" + "---|" * 7]
    fmt = lambda row, key: f"{row[key]:.1f}" if key in row else row.get("error", "—")  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {'on' if r['grad_checkpointing'] else 'off'} | "
                     f"{fmt(r, 'resident_mib')} | {fmt(r, 'step_peak_mib')} | "
                     f"{fmt(r, 'max_memory_allocated_mib') if 'max_memory_allocated_mib' in r else '—'} | "
                     f"{fmt(r, 'step_ms')} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    runs = [(spec.split(":")[0], int(spec.split(":")[1]))
            for spec in (args.runs or DEFAULT_RUNS[device.type]).split(",")]
    rows = [measure(name, batch, checkpointing, device, bf16, args.iters)
            for name, batch in runs for checkpointing in (False, True)]
    env = dict(environment(device), precision="bf16 autocast" if bf16 else "fp32",
               backend=crossvit_fast.backends.resolve(None, device))
    print(f"{env['device']}, {env['precision']}, backend {env['backend']}, torch {env['torch']}, "
          f"commit {env['commit']}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
