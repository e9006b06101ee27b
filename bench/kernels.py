"""Kernel microbenchmarks: each fused op against the naive reference, eager and compiled.

For every op shape of the chosen variants (bench/shapes.py), every dtype, batch size and token
count, forward and forward+backward, this times each backend usable on the device, the eager naive
reference (``crossvit_fast.reference``) and ``torch.compile`` of that reference. Each row gets
the median and spread, the bytes and FLOPs the op must move and do (bench/costs.py), the achieved
GB/s and TFLOP/s as fractions of the copy bandwidth and matmul peak measured in the same run
(bench/peaks.py), and the speedups over eager and compiled naive.

The GPU default (crossvit_18_240's shapes at batch 256, bf16 then fp32) needs one compilation of
the naive reference per shape, pass and dtype (24); ``--compile-budget-s`` caps the seconds spent
compiling, past which the compiled reference is left out (listed under ``skipped``), so that a
default run stays under two minutes on an H100.

    python -m bench.kernels [--smoke] [--device cuda] [--out bench/results]
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from crossvit_fast import backends, ops, reference
from crossvit_fast.benchmarking import kernel_time, summarize, time_fn
from crossvit_fast.variants import list_models

from . import peaks
from .common import (StudyResults, Stopped, environment_lines, fmt, geomean, markdown_table, out_dir,
                     parse_dtype, parse_list, pick_device, stop_on_sigterm)
from .costs import op_cost
from .shapes import OPS, Case, op_cases

NAIVE = {"cross_attention": reference.cls_cross_attention,
         "cls_projection": reference.cls_projection,
         "add_layer_norm": reference.add_layer_norm}
FUSED = {"cross_attention": ops.cls_cross_attention,
         "cls_projection": ops.cls_projection,
         "add_layer_norm": ops.add_layer_norm}
PASSES = ("fwd", "fwd+bwd")
NAIVE_IMPLS = ("naive", "naive+compile")
EPS = 1e-6


@dataclass
class Settings:
    """One run of the study, every default filled in."""
    device: torch.device
    dtype_names: List[str]
    models: List[str]
    batch_sizes: List[int]
    patch_counts: List[Optional[int]]  # None: each variant's own N
    backends: List[str]
    skipped_backends: Dict[str, str]
    warmup: int
    iters: int
    compile_options: Dict[str, str]
    compile_budget_s: Optional[float]
    copy_bytes: int
    matmul_n: int
    smoke: bool
    compile_spent_s: float = field(default=0.0, init=False)

    def compile_allowed(self) -> bool:
        """Whether the compile budget has seconds left for another compilation."""
        return self.compile_budget_s is None or self.compile_spent_s < self.compile_budget_s

    def config(self) -> dict:
        """The settings as recorded in the results."""
        return dict(smoke=self.smoke, device=str(self.device), dtypes=self.dtype_names,
                    models=self.models, batch_sizes=self.batch_sizes,
                    patch_counts=["native" if n is None else n for n in self.patch_counts],
                    backends=self.backends, skipped_backends=self.skipped_backends,
                    warmup=self.warmup, iters=self.iters, compile=self.compile_options,
                    compile_budget_s=self.compile_budget_s)


@dataclass
class OpInputs:
    """The arguments of one op call: tensors (differentiated in fwd+bwd), then plain values."""
    tensors: List[Tensor]
    extra: Tuple


def make_inputs(case: Case, batch: int, dtype: torch.dtype, device: torch.device,
                requires_grad: bool) -> OpInputs:
    """Random arguments for ``case`` at ``batch``, the same for every implementation.

    The cross-attention's patches are a strided view ``tokens[:, 1:]`` of the other branch's
    tokens, as the model passes them.
    """
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, scale: float = 1.0, offset: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale + offset).to(dtype)

    C = case.c_in
    norm = [rand(C, scale=0.1, offset=1.0), rand(C, scale=0.1)]
    if case.op == "cross_attention":
        patches = rand(batch, case.patches + 1, C)[:, 1:].detach()
        linears = [t for _ in range(4) for t in (rand(C, C, scale=C ** -0.5), rand(C, scale=0.1))]
        tensors = [rand(batch, 1, C), patches, *norm, *linears]
        extra = (case.heads, (C // case.heads) ** -0.5, EPS)
    elif case.op == "cls_projection":
        tensors = [rand(batch, 1, C), *norm, rand(case.c_out, C, scale=C ** -0.5),
                   rand(case.c_out, scale=0.1)]
        extra = (EPS,)
    else:
        tokens = (batch, case.patches + 1, C)
        tensors = [rand(*tokens), rand(*tokens), *norm]
        extra = (EPS,)
    return OpInputs([t.requires_grad_(requires_grad) for t in tensors], extra)


def _as_tuple(out) -> Tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def op_function(op: str, impl: str, compile_options: Dict[str, str]) -> Callable:
    """The callable for ``impl``: a backend name, ``naive`` or ``naive+compile``.

    Each compiled function starts from fresh Dynamo caches, so that a sweep over many shapes
    never hits the recompile limit (past which Dynamo silently falls back to eager).
    """
    if impl == "naive":
        return NAIVE[op]
    if impl == "naive+compile":
        torch._dynamo.reset()
        return torch.compile(NAIVE[op], dynamic=False, fullgraph=True, **compile_options)
    return functools.partial(FUSED[op], backend=impl)


def timed_call(fn: Callable, inputs: OpInputs, grad_outputs: Optional[List[Tensor]]) -> Callable:
    """A no-argument call of ``fn``: forward only if ``grad_outputs`` is None, else forward and
    the gradients of every input tensor (``autograd.grad``: nothing accumulates between calls)."""
    if grad_outputs is None:
        def forward():
            with torch.no_grad():
                return fn(*inputs.tensors, *inputs.extra)
        return forward

    def forward_backward():
        out = _as_tuple(fn(*inputs.tensors, *inputs.extra))
        return torch.autograd.grad(out, inputs.tensors, grad_outputs)
    return forward_backward


def output_grads(op: str, inputs: OpInputs) -> List[Tensor]:
    """Random upstream gradients shaped like the op's outputs."""
    with torch.no_grad():
        outs = _as_tuple(NAIVE[op](*inputs.tensors, *inputs.extra))
    return [torch.randn_like(o) for o in outs]


def roofline(bytes_: int, flops: int, median_s: float, copy: dict, matmul: dict) -> dict:
    """Achieved GB/s and TFLOP/s of a floor of ``bytes_``/``flops`` done in ``median_s``, and
    their fractions of the run's measured copy bandwidth and matmul peak."""
    gbps, tflops = bytes_ / median_s / 1e9, flops / median_s / 1e12
    return dict(GBps=gbps, TFLOPs=tflops, bw_fraction=gbps / copy["GBps"],
                flop_fraction=tflops / matmul["TFLOPs"])


def first_call_seconds(call: Callable, device: torch.device) -> float:
    """Wall seconds of the first call: the compilation (Dynamo + Inductor, or a Triton JIT)."""
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(case: Case, users: List[str], batch: int, pass_name: str, dtype_name: str,
            settings: Settings, run_peaks: dict) -> Tuple[List[dict], List[dict]]:
    """Rows for every implementation of ``case`` at ``batch`` in one pass, with their speedups,
    and the implementations left out (the compiled reference, past the compile budget)."""
    with_backward = pass_name == "fwd+bwd"
    dtype = parse_dtype(dtype_name)
    inputs = make_inputs(case, batch, dtype, settings.device, with_backward)
    grads = output_grads(case.op, inputs) if with_backward else None
    cost = op_cost(case, batch, dtype.itemsize, with_backward)
    key = dict(op=case.op, variants=users, shape=case.shape(batch), pass_name=pass_name, dtype=dtype_name)
    rows, skipped = [], []
    for impl in (*NAIVE_IMPLS, *settings.backends):
        if impl == "naive+compile" and not settings.compile_allowed():
            skipped.append(dict(key, impl=impl, reason=f"compile budget of {settings.compile_budget_s:g} s spent"))
            continue
        call = timed_call(op_function(case.op, impl, settings.compile_options), inputs, grads)
        first_call_s = first_call_seconds(call, settings.device)
        if impl == "naive+compile":
            settings.compile_spent_s += first_call_s
        stats = summarize(time_fn(call, settings.device, warmup=settings.warmup, iters=settings.iters))
        gpu_s = kernel_time(call, settings.device)
        rows.append(dict(key, impl=impl, bytes=cost.bytes, flops=cost.flops, first_call_s=first_call_s,
                         **stats, **roofline(cost.bytes, cost.flops, stats["median_s"], run_peaks["copy"],
                                             run_peaks["matmul"][dtype_name]),
                         kernel_s=gpu_s, kernel_bw_fraction=(
                             cost.bytes / gpu_s / 1e9 / run_peaks["copy"]["GBps"] if gpu_s else None)))
    timed = {row["impl"]: row["median_s"] for row in rows}
    kernels = {row["impl"]: row["kernel_s"] for row in rows}
    for row in rows:
        row["vs_naive"] = timed["naive"] / row["median_s"]
        row["vs_compiled_naive"] = (timed["naive+compile"] / row["median_s"]
                                    if "naive+compile" in timed else None)
        row["kernel_vs_naive"] = kernels["naive"] / row["kernel_s"] if row["kernel_s"] else None
    return rows, skipped


def measure_peaks(settings: Settings) -> dict:
    """The run's copy bandwidth, and its matmul peak in each of the study's dtypes."""
    timing = dict(warmup=settings.warmup, iters=max(settings.iters, 5))
    return dict(copy=peaks.copy_bandwidth(settings.device, settings.copy_bytes, **timing),
                matmul={name: peaks.matmul_peak(settings.device, settings.matmul_n, parse_dtype(name), **timing)
                        for name in settings.dtype_names})


def summary_rows(rows: List[dict]) -> List[List[str]]:
    """Per dtype, op, pass and implementation: geometric-mean speedups and median roofline fractions."""
    table = []
    for dtype_name in dict.fromkeys(r["dtype"] for r in rows):
        for op in OPS:
            for pass_name in PASSES:
                for impl in dict.fromkeys(r["impl"] for r in rows):
                    group = [r for r in rows
                             if (r["dtype"], r["op"], r["pass_name"], r["impl"]) == (dtype_name, op, pass_name, impl)]
                    if not group:
                        continue
                    bw = sorted(r["bw_fraction"] for r in group)[len(group) // 2]
                    vs_compiled = [r["vs_compiled_naive"] for r in group if r["vs_compiled_naive"] is not None]
                    kernel_vs = [r["kernel_vs_naive"] for r in group if r.get("kernel_vs_naive")]
                    kernel_bw = sorted(r["kernel_bw_fraction"] for r in group if r.get("kernel_bw_fraction"))
                    table.append([dtype_name, op, pass_name, impl, len(group),
                                  f"{geomean([r['vs_naive'] for r in group]):.2f}x",
                                  f"{geomean(vs_compiled):.2f}x" if vs_compiled else "—", f"{100 * bw:.1f}%",
                                  f"{geomean(kernel_vs):.2f}x" if kernel_vs else "—",
                                  f"{100 * kernel_bw[len(kernel_bw) // 2]:.1f}%" if kernel_bw else "—"])
    return table


SUMMARY_HEADERS = ["dtype", "op", "pass", "impl", "cases", "vs naive (geomean)", "vs compiled naive (geomean)",
                   "% copy BW (median)", "GPU time vs naive (geomean)", "% copy BW, GPU time (median)"]
ROW_HEADERS = ["dtype", "op", "shape", "B", "pass", "impl", "median µs", "p10–p90 µs", "first call s", "GB/s",
               "% copy BW", "TFLOP/s", "% matmul peak", "vs naive", "vs compiled naive", "GPU µs",
               "% copy BW, GPU time", "GPU time vs naive"]


def table_row(row: dict) -> List[str]:
    """One result row as Markdown cells."""
    shape = " ".join(f"{k}={v}" for k, v in row["shape"].items() if k != "B")
    return [row["dtype"], row["op"], shape, row["shape"]["B"], row["pass_name"], row["impl"],
            f"{row['median_s'] * 1e6:.1f}", f"{row['p10_s'] * 1e6:.1f}–{row['p90_s'] * 1e6:.1f}",
            f"{row['first_call_s']:.2f}", f"{row['GBps']:.1f}", f"{100 * row['bw_fraction']:.1f}%",
            f"{row['TFLOPs']:.3f}", f"{100 * row['flop_fraction']:.2f}%", f"{row['vs_naive']:.2f}x",
            fmt(row["vs_compiled_naive"], ".2f") + ("x" if row["vs_compiled_naive"] is not None else ""),
            fmt(None if row.get("kernel_s") is None else row["kernel_s"] * 1e6, ".1f"),
            fmt(None if row.get("kernel_bw_fraction") is None else 100 * row["kernel_bw_fraction"], ".1f"),
            fmt(row.get("kernel_vs_naive"), ".2f")]


def markdown(results: StudyResults) -> str:
    """The results file's Markdown: environment, peaks, settings, a summary, then every row."""
    payload = results.payload
    copy, matmul = payload["peaks"]["copy"], payload["peaks"]["matmul"]
    config = payload["config"]
    rows = payload["rows"]
    matmuls = ", ".join(f"{name} {m['TFLOPs']:.3f} TFLOP/s" for name, m in matmul.items())
    left_out = [f"{s['dtype']} {s['op']} {s['pass_name']} B={s['shape']['B']} {s['impl']}: {s['reason']}"
                for s in payload["skipped"]]
    return "\n".join([
        f"# Kernel microbenchmarks on {payload['environment']['device']}", "",
        *environment_lines(payload["environment"]), "",
        f"Measured peaks (this run): copy {copy['GBps']:.1f} GB/s ({copy['bytes'] / 2 ** 20:.0f} MiB moved); "
        f"matmul (n={settings_n(matmul)}) {matmuls}.", "",
        f"dtypes {config['dtypes']}; variants {config['models']}; batch sizes {config['batch_sizes']}; token counts "
        f"{config['patch_counts']}; backends {config['backends']} (skipped: "
        f"{config['skipped_backends'] or 'none'}); torch.compile {config['compile']}, compile budget "
        f"{config['compile_budget_s']} s; {config['warmup']} warm-up + {config['iters']} timed runs"
        + (" (smoke run)" if config["smoke"] else "") + "."
        + (f" **Incomplete: {payload['stopped']}.**" if payload.get("stopped") else ""),
        "", "Two timings per row: the median of synchronized single calls (CUDA events around each "
        "call: host and GPU latency, what a lone call costs), and on CUDA the GPU time per call "
        "(the profiler's device time of every kernel the call launches, without the host time "
        "between them). Fractions of the copy bandwidth are given for both.",
        "", "## Summary", "", markdown_table(SUMMARY_HEADERS, summary_rows(rows)),
        "", "## Every case", "", markdown_table(ROW_HEADERS, [table_row(r) for r in rows]),
        *(["", "## Left out", ""] + [f"- {line}" for line in left_out] if left_out else []),
    ])


def settings_n(matmul: dict) -> int:
    """The matmul size of the peaks (the same for every dtype)."""
    return next(iter(matmul.values()))["n"]


def draw(plt, rows: List[dict]):
    """Fraction of the copy bandwidth against bytes moved: one panel per op and pass, one marker
    per dtype."""
    fig, axes = plt.subplots(len(OPS), len(PASSES), figsize=(11, 12), squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    for i, op in enumerate(OPS):
        for j, pass_name in enumerate(PASSES):
            ax = axes[i][j]
            for k, impl in enumerate(impls):
                for dtype_name, marker in zip(dtypes, "os^"):
                    group = [r for r in rows if (r["op"], r["pass_name"], r["impl"], r["dtype"])
                             == (op, pass_name, impl, dtype_name)]
                    ax.scatter([r["bytes"] for r in group], [r["bw_fraction"] for r in group], s=14,
                               marker=marker, color=f"C{k}", label=f"{impl} {dtype_name}")
            sizes = [r["bytes"] for r in rows if (r["op"], r["pass_name"]) == (op, pass_name)]
            # A log axis only where the sizes span a decade: on a narrower range its minor labels collide.
            wide = bool(sizes) and max(sizes) > 10 * min(sizes)
            ax.set(xscale="log" if wide else "linear", yscale="log", title=f"{op} ({pass_name})",
                   xlabel="bytes the op must move", ylabel="fraction of copy bandwidth")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    return fig


def usable_backends(requested: Optional[str], device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """The backends to time (``--backends`` or every usable one) and why the others are left out."""
    names = parse_list(requested) if requested else list(backends.CONCRETE_BACKENDS)
    reasons = {name: backends.unavailable_reason(name, device) for name in names}
    usable = [name for name, reason in reasons.items() if reason is None]
    skipped = {name: reason for name, reason in reasons.items() if reason is not None}
    skipped.update({name: "not requested" for name in backends.CONCRETE_BACKENDS if name not in names})
    return usable, skipped


def settings_from(args: argparse.Namespace) -> Settings:
    """Fill the defaults that depend on ``--smoke`` and on the device."""
    device = pick_device(args.device, args.smoke)
    gpu = device.type == "cuda"
    smoke = args.smoke
    models = args.models or ("crossvit_tiny_240" if smoke else "crossvit_18_240")
    tokens = args.tokens or ("16" if smoke else "native")
    chosen, skipped = usable_backends(args.backends, device)
    compile_options = {"backend": args.compile_backend or ("aot_eager" if smoke else "inductor")}
    if args.compile_mode:
        compile_options["mode"] = args.compile_mode
    budget = args.compile_budget_s if args.compile_budget_s is not None else (60.0 if gpu else None)
    dtype_names = parse_list(args.dtypes or ("bf16,fp32" if gpu else "fp32"))
    for name in dtype_names:
        parse_dtype(name)  # a clear error for an unknown name, before anything runs
    return Settings(
        device=device, dtype_names=dtype_names,
        models=list_models() if models == "all" else parse_list(models),
        batch_sizes=parse_list(args.batch_sizes or ("2" if smoke else "256" if gpu else "1,8,32"), int),
        patch_counts=[None if t == "native" else int(t) for t in parse_list(tokens)],
        backends=chosen, skipped_backends=skipped,
        warmup=args.warmup if args.warmup is not None else (1 if smoke else 5 if gpu else 2),
        iters=args.iters if args.iters is not None else (3 if smoke else 50 if gpu else 10),
        compile_options=compile_options, compile_budget_s=None if budget is not None and budget < 0 else budget,
        copy_bytes=(16 if smoke else 1024 if gpu else 256) * 2 ** 20,
        matmul_n=256 if smoke else 8192 if gpu else 2048, smoke=smoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU, few runs, torch.compile with aot_eager: checks the harness in seconds")
    parser.add_argument("--device", default=None, help="auto (CUDA if present; CPU with --smoke), cpu, cuda, cuda:N")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated from fp32,bf16,fp16: every tensor's dtype, one sweep each "
                             "(default bf16,fp32 on CUDA, fp32 on the CPU)")
    parser.add_argument("--models", default=None,
                        help="comma-separated variants whose op shapes to time, or 'all' "
                             "(default crossvit_18_240; crossvit_tiny_240 with --smoke)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 256 on CUDA, 1,8,32 on CPU, 2 with --smoke)")
    parser.add_argument("--tokens", default=None,
                        help="patch counts N to sweep, comma-separated; 'native' is each variant's own (default native; 16 with --smoke)")
    parser.add_argument("--backends", default=None, help="comma-separated fused backends (default: every usable one)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (they include compilation)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend for the naive reference (default inductor; aot_eager with --smoke)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's default)")
    parser.add_argument("--compile-budget-s", type=float, default=None,
                        help="seconds of compilation after which the compiled reference is left out "
                             "(default 60 on CUDA, none elsewhere; negative: none)")
    parser.add_argument("--out", default=None,
                        help="results folder (default bench/results; a temporary folder with --smoke)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from tqdm import tqdm
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    stop_on_sigterm()
    run_peaks = measure_peaks(settings)
    results = StudyResults(out_dir(args.out, settings.smoke), "kernels-smoke" if settings.smoke else "kernels",
                           settings.device, settings.config(), peaks=run_peaks, skipped=[])
    cases = op_cases(settings.models, settings.patch_counts)
    plan = [(dtype_name, case, users, batch, pass_name) for dtype_name in settings.dtype_names
            for case, users in cases.items() for batch in settings.batch_sizes for pass_name in PASSES]
    try:
        for dtype_name, case, users, batch, pass_name in tqdm(plan, desc="kernels", unit="case", file=sys.stderr):
            rows, skipped = measure(case, users, batch, pass_name, dtype_name, settings, run_peaks)
            results.payload["skipped"] += skipped
            for row in rows:
                results.add(row)
    except Stopped as stop:
        results.stop(str(stop))
    results.payload["config"]["compile_spent_s"] = settings.compile_spent_s
    written = results.finish(markdown(results), draw)
    print(markdown_table(SUMMARY_HEADERS, summary_rows(results.payload["rows"])))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
