"""onnxruntime (CPU) latency and throughput: crossvit_fast's ONNX export against timm's own.

Each model is exported with torch's default exporter (``torch.onnx.export(model, (x,), path)``,
the dynamo exporter, batch axis dynamic), loaded into one onnxruntime CPU session, and timed in
the same process side by side: latency at batch 1 and throughput at batch 16 (images/s), median
over timed runs after warm-up. The export of crossvit_fast is the PyTorch backend's absorbed
math (the CLS cross-attention without K and V over the tokens); timm's forms K and V.

    python -m bench.onnx_runtime                       # crossvit_tiny_240 and crossvit_18_240
    python -m bench.onnx_runtime --smoke               # crossvit_tiny_240, 2 runs, a temporary folder
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

import crossvit_fast

from .common import StudyResults, fmt, markdown_table, out_dir, parse_list
from .e2e import load_timm

SIDES = ("timm", "fast")


def export(model: torch.nn.Module, res: int, path: Path) -> None:
    """torch's default ONNX export with a dynamic batch axis."""
    torch.onnx.export(model, (torch.randn(2, 3, res, res),), str(path), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))


def time_session(session, x, warmup: int, iters: int) -> List[float]:
    """Seconds per ``session.run`` on ``x`` (numpy), ``iters`` runs after ``warmup``."""
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return times


def measure(name: str, side: str, timm, batches, warmup: int, iters: int, threads: Optional[int],
            folder: Path) -> List[dict]:
    import onnxruntime as ort
    torch.manual_seed(0)
    model = (timm.create_model(name) if side == "timm" else crossvit_fast.create_model(name)).eval()
    res = model.pretrained_cfg["input_size"][-1]
    path = folder / f"{name}-{side}.onnx"
    start = time.perf_counter()
    export(model, res, path)
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, res, res).numpy()
        median = statistics.median(time_session(session, x, warmup, iters))
        rows.append(dict(variant=name, side=side, batch=batch, median_s=median,
                         images_per_s=batch / median, export_s=export_s,
                         onnx_mb=path.stat().st_size / 2 ** 20))
    return rows


def markdown(results: StudyResults) -> str:
    payload = results.payload
    rows = payload["rows"]
    by_key = {(r["variant"], r["batch"], r["side"]): r for r in rows}
    lines = []
    for (variant, batch) in dict.fromkeys((r["variant"], r["batch"]) for r in rows):
        timm_row, fast_row = by_key.get((variant, batch, "timm")), by_key.get((variant, batch, "fast"))
        speedup = timm_row["median_s"] / fast_row["median_s"] if timm_row and fast_row else None
        cell = lambda r: "—" if r is None else f"{r['median_s'] * 1e3:.1f} ms ({r['images_per_s']:.1f} img/s)"  # noqa: E731
        lines.append([variant, batch, cell(timm_row), cell(fast_row), fmt(speedup, ".2f") + ("x" if speedup else "")])
    env = payload["environment"]
    config = payload["config"]
    return "\n".join([
        f"# onnxruntime (CPU): crossvit_fast's ONNX export against timm's, on {env['device']}", "",
        *[f"- {k}: {v}" for k, v in env.items()],
        f"- onnxruntime: {payload['onnxruntime']}, intra-op threads: {config['threads'] or 'default'}", "",
        f"torch's default exporter (dynamo), batch axis dynamic; median of {config['iters']} runs after "
        f"{config['warmup']} warm-up, one session per model, fp32. Batch 1: latency; batch 16: throughput."
        + (" (smoke run)" if config["smoke"] else ""), "",
        markdown_table(["variant", "batch", "timm", "crossvit_fast", "speedup"], lines),
    ])


def draw(plt, rows):
    fig, ax = plt.subplots(figsize=(7, 3))
    labels = [f"{r['variant']} B={r['batch']} {r['side']}" for r in rows]
    ax.barh(labels, [r["images_per_s"] for r in rows])
    ax.set(xlabel="images/s (onnxruntime, CPU)")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.onnx_runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="crossvit_tiny_240, batch 1, 2 runs, temporary folder")
    parser.add_argument("--variants", default=None, help="comma-separated (default crossvit_tiny_240,crossvit_18_240)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 3)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    import onnxruntime as ort
    timm, reason = load_timm()
    if timm is None:
        raise SystemExit(f"bench.onnx_runtime compares with timm's export: {reason}")
    variants = parse_list(args.variants or ("crossvit_tiny_240" if args.smoke else "crossvit_tiny_240,crossvit_18_240"))
    unknown = [v for v in variants if v not in crossvit_fast.list_models()]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; expected from {', '.join(crossvit_fast.list_models())}")
    batches = parse_list(args.batch_sizes or ("1" if args.smoke else "1,16"), int)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    iters = args.iters if args.iters is not None else (2 if args.smoke else 20)
    config = dict(smoke=args.smoke, variants=variants, batches=batches, warmup=warmup, iters=iters,
                  threads=args.threads, exporter="dynamo (torch's default)")
    study = "onnxruntime-smoke" if args.smoke else "onnxruntime"
    results = StudyResults(out_dir(args.out, args.smoke), study, torch.device("cpu"), config,
                           onnxruntime=ort.__version__)
    with tempfile.TemporaryDirectory() as folder:
        for name in variants:
            for side in SIDES:
                for row in measure(name, side, timm, batches, warmup, iters, args.threads, Path(folder)):
                    results.add(row)
    text = markdown(results)
    written = results.finish(text, draw)
    print(text[text.index("| variant"):])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
