"""CUDA-graph replays at small batch: timm against crossvit_fast under the same capture, and
crossvit_fast with its CLS projections fused, its CLS exchanges fused, its two branches on two
streams, or two of these, under the capture (GPU only).

A replay spends no host time per kernel, so its time is the GPU's: at batch 1 the sum of about
230 small kernels of a few µs each for crossvit_tiny_240, where issue 18 asks for 1.25x timm
under the same capture (1.02x at dc1b136: bench/results/gpu-check-nvidia-h200.md).
``GraphedInference`` already fuses every block norm under its capture. The fused CLS projection
(LayerNorm, GELU and Linear in one kernel: 24 kernels fewer per crossvit_tiny_240 forward) is off
by default because it lost at batch 256 in bf16 (bench/results/gpu-check-nvidia-h100.md, run 9).
The fused CLS exchange (crossvit_fast.fused_exchange: each direction's projection,
cross-attention and projection back in one kernel) leaves out about 90 kernels, more under
autocast, where timm's projections cast their inputs and weights. The branches' blocks and CLS
exchanges are independent, and at batch 1 each kernel fills a fraction of the GPU: on two streams
(crossvit_fast.branch_streams) they can overlap. All three are off by default until this
measures them. A row whose capture fails is reported and left out.

Per variant, dtype (fp32, or bf16 autocast) and batch, for each implementation: the time per
replay back to back (rounds interleaved across the implementations, median), the synchronized
latency per call (median), the summed kernel time and kernel count of one replay (profiler;
kernels that overlap on two streams each count in full), and the
relative error of its logits against timm's eager fp32 forward (crossvit_fast's where timm does
not import).

    python scripts/graphs_ab.py [--variants crossvit_tiny_240] [--batches 1] [--dtypes fp32,bf16]
        [--skip WORDS | --only WORDS] [--out DIR]
"""
import argparse
import contextlib
import json
import statistics
import sys
import traceback
from functools import partial
from pathlib import Path
from typing import Callable, Dict, NamedTuple

import torch

import crossvit_fast
from crossvit_fast import layers
from crossvit_fast.branch_streams import concurrent_branches
from crossvit_fast.benchmarking import environment, interleaved_back_to_back, time_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout, for bench/
from bench.common import device_slug, markdown_table  # noqa: E402
from bench.e2e import load_timm  # noqa: E402

class Setting(NamedTuple):
    """What a crossvit_fast row changes under the capture (all off: the library's default)."""
    cls_projection_fused: bool = False
    cls_exchange_fused: bool = False
    branches_on_two_streams: bool = False


# crossvit_fast's rows: name → its setting under the capture
SETTINGS = {"fast+graphs": Setting(),
            "fast+graphs, CLS projection fused": Setting(cls_projection_fused=True),
            "fast+graphs, CLS exchange fused": Setting(cls_exchange_fused=True),
            "fast+graphs, branches on two streams": Setting(branches_on_two_streams=True),
            "fast+graphs, projection fused, two streams": Setting(True, False, True),
            "fast+graphs, exchange fused, two streams": Setting(False, True, True)}


@contextlib.contextmanager
def fused_cls_ops(setting: Setting):
    """Inside the block, the CLS projections and the CLS exchange run fused or as timm's modules
    as ``setting`` says; the library's settings come back after it."""
    saved = layers.FUSED_CLS_PROJECTION, layers.FUSED_CLS_EXCHANGE
    layers.FUSED_CLS_PROJECTION, layers.FUSED_CLS_EXCHANGE = (setting.cls_projection_fused,
                                                              setting.cls_exchange_fused)
    try:
        yield
    finally:
        layers.FUSED_CLS_PROJECTION, layers.FUSED_CLS_EXCHANGE = saved


def implementations(timm_model, fast_model, graphed: Callable, autocast: Callable,
                    settings: Dict[str, Setting] = SETTINGS) -> Dict[str, Callable]:
    """name → ``call(x)`` for each implementation. ``graphed`` wraps a model for replay
    (``GraphedInference``; the first call of a shape captures), ``autocast`` is the dtype's
    context. A row's settings are held around every call of it, so that they are in force
    whenever a capture happens; a replay does not read them."""
    def call_of(model, setting):
        def call(x):
            with (fused_cls_ops(setting), concurrent_branches(setting.branches_on_two_streams),
                  autocast()):
                return model(x)
        return call
    calls = {} if timm_model is None else {"timm+graphs": call_of(graphed(timm_model), Setting())}
    for name, setting in settings.items():
        calls[name] = call_of(graphed(fast_model), setting)
    return calls


def captured(calls: Dict[str, Callable], x) -> Dict[str, Callable]:
    """The implementations whose first call (the capture) ran; one that raised is reported with
    its traceback and left out, so that the others are still measured."""
    kept = {}
    for name, call in calls.items():
        try:
            call(x)
        except Exception:   # a kernel that never ran on this GPU may fail: report, go on
            print(f"{name}: left out, its capture failed:", file=sys.stderr)
            traceback.print_exc()
        else:
            kept[name] = call
    return kept


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """‖out − reference‖ / ‖reference‖, in float64."""
    out, reference = out.double(), reference.double()
    return ((out - reference).norm() / reference.norm()).item()


def replay_kernels(call: Callable, x, top: int = 12):
    """(GPU seconds, count, the ``top`` kernels by GPU time as (name, calls, seconds)) of the
    kernels and copies of one call (those of a replayed graph included, and the input and
    output copies around it), from the profiler; (None, 0, []) where it sees none of them."""
    from torch.profiler import ProfilerActivity, profile
    call(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(x)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return None, 0, []
    by_name: Dict[str, list] = {}
    for e in kernels:
        calls_and_us = by_name.setdefault(e.name, [0, 0.0])
        calls_and_us[0] += 1
        calls_and_us[1] += e.time_range.elapsed_us()
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return (sum(us for _, us in by_name.values()) / 1e6, len(kernels),
            [(name, n, us / 1e6) for name, (n, us) in ranked])


def measure(variant: str, dtype: str, batch: int, timm, settings: Dict[str, Setting]) -> list:
    torch.manual_seed(0)
    fast_model = crossvit_fast.create_model(variant).cuda().eval()
    timm_model = None
    if timm is not None:
        timm_model = timm.create_model(variant).cuda().eval()
        fast_model.load_state_dict(timm_model.state_dict())
    reference_model = timm_model if timm_model is not None else fast_model
    size = reference_model.pretrained_cfg["input_size"][-1]
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.no_grad():
        reference = reference_model(x).float()
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == "bf16"
                else contextlib.nullcontext)
    calls = captured(implementations(timm_model, fast_model, crossvit_fast.GraphedInference,
                                     autocast, settings), x)
    # back to back: rounds interleaved across the implementations; latency: each call on its own
    back_to_back = interleaved_back_to_back({name: partial(call, x) for name, call in calls.items()},
                                            "cuda", steps=50, rounds=7)
    latency = {name: statistics.median(time_fn(partial(call, x), "cuda", iters=35))
               for name, call in calls.items()}
    # on replays after many others, each call in an autocast block of its own
    errors = {name: relative_error(call(x), reference) for name, call in calls.items()}
    rows = []
    for name, call in calls.items():
        gpu_s, kernels, top = replay_kernels(call, x)
        rows.append(dict(variant=variant, dtype=dtype, batch=batch, impl=name,
                         back_to_back_s=back_to_back[name], latency_s=latency[name],
                         gpu_s=gpu_s, kernels=kernels, rel_err_vs_timm_fp32=errors[name],
                         top_kernels=top))
        print(f"{variant} {dtype} batch {batch}, {name}: {kernels} kernels and copies, the most "
              f"GPU time first:")
        for kernel, n, seconds in top:
            print(f"  {seconds * 1e6:8.1f} µs  {n:4d}x  {kernel[:110]}")
    peer = back_to_back.get("timm+graphs")
    for row in rows:
        row["vs_timm"] = peer / row["back_to_back_s"] if peer else None
    return rows


def table(rows: list) -> str:
    def us(s):
        return "—" if s is None else f"{s * 1e6:.1f}"
    return markdown_table(
        ["variant", "dtype", "batch", "implementation", "µs/replay (back to back)",
         "µs latency", "GPU µs", "kernels", "vs timm+graphs", "rel. error vs timm fp32"],
        [[r["variant"], r["dtype"], r["batch"], r["impl"], us(r["back_to_back_s"]),
          us(r["latency_s"]), us(r["gpu_s"]), r["kernels"],
          "—" if r["vs_timm"] is None else f"{r['vs_timm']:.2f}x",
          f"{r['rel_err_vs_timm_fp32']:.1e}"] for r in rows])


def chosen_rows(skip: str = "", only: str = "") -> Dict[str, Setting]:
    """:data:`SETTINGS` without the rows whose name contains any of the comma-separated words of
    ``skip``, and, where ``only`` names words, only the rows whose name contains one of them."""
    def words(text):
        return [word for word in text.split(",") if word]
    return {name: setting for name, setting in SETTINGS.items()
            if not any(w in name for w in words(skip))
            and (not words(only) or any(w in name for w in words(only)))}


def write(rows: list, out: Path) -> None:
    """The rows so far as JSON and Markdown in ``out`` (after each variant, dtype and batch, so
    that a process ended by a fault or its time limit keeps what it measured)."""
    env = environment("cuda")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"graphs-ab-{device_slug(env['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    stem.with_suffix(".md").write_text(
        f"# CUDA-graph replays: {env['device']}, torch {env['torch']}, Triton {env['triton']}, "
        f"commit {env['commit']}\n\n{table(rows)}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="crossvit_tiny_240")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--skip", default="",
                        help="leave out the crossvit_fast rows whose name contains any of these "
                             "comma-separated words (e.g. 'exchange' after a kernel's fault: a "
                             "CUDA fault ends the process's other rows too)")
    parser.add_argument("--only", default="",
                        help="measure only the crossvit_fast rows whose name contains one of these "
                             "comma-separated words (timm's row is always measured)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("graphs_ab: needs a CUDA GPU (CUDA graphs)", file=sys.stderr)
        return 2
    timm, reason = load_timm()
    if timm is None:
        print("timm left out:", reason)
    settings = chosen_rows(args.skip, args.only)
    rows = []
    for variant in args.variants.split(","):
        for dtype in args.dtypes.split(","):
            for batch in map(int, args.batches.split(",")):
                new = measure(variant, dtype, batch, timm, settings)
                rows += new
                print(table(new), flush=True)
                write(rows, Path(args.out))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
