"""End-to-end throughput: images/s of inference and of a training step, fused model vs timm.

Each implementation of crossvit_fast has its like on timm's side, run the same way:
``fast``/``timm`` (eager: ``crossvit_fast.CrossViT`` on the default backend, timm's own
``CrossVit``), ``+graphs`` (the inference forward captured and replayed as one CUDA graph by
``crossvit_fast.GraphedInference``, CUDA only), ``+compile`` (``torch.compile``, default mode)
and ``+compile-ro`` (``mode="reduce-overhead"``: inductor with CUDA-graph trees); in fp32 or under
bf16/fp16 autocast. Inference is a forward under ``no_grad``; a training step is zero_grad,
forward, cross-entropy, backward and an AdamW step (with a GradScaler under fp16).

Each row has two times: the median over warmed-up runs each synchronized on its own (latency),
and the median over rounds of N steps back to back with one synchronize (throughput, as a
training loop runs: the host may queue a step while the GPU runs the last); images/s from the
back-to-back time; ``vs peer``, the speedup over timm run the same way (fast+compile against
timm+compile...), the comparison that counts; on CUDA the GPU time of the step's kernels; the
first call's seconds (the compilation); the peak CUDA memory; and the achieved model FLOP/s
(timm's FLOPs, counted once per variant with FlopCounterMode on the meta device) as a fraction
of the matmul peak measured in the same run (bench/peaks.py).

Each crossvit_fast row is measured together with its timm peer (:func:`groups_of`): timm's
weights loaded into ours, one batch, their first outputs compared, their back-to-back rounds
interleaved. Eager rows run first and compiled ones after, each compiled model compiled once;
``--compile-budget-s`` caps the seconds spent compiling, past which compiled rows are left out
(listed under ``skipped``), so that a time limit cuts the most expensive rows first.

    python -m bench.e2e --preset gpu-quick      # about 3 minutes on an H100
    python -m bench.e2e --preset compile-race   # issue 11's rows: compiled and graphed, both sides
    python -m bench.e2e --smoke                  # seconds on a CPU; writes to a temporary folder
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import crossvit_fast
from crossvit_fast import backends
from crossvit_fast.benchmarking import interleaved_rounds, kernel_time, load_profiler, summarize, time_fn
from crossvit_fast.reference import naive_math
from crossvit_fast.variants import list_models

from . import peaks
from .common import (StudyResults, Stopped, environment_lines, fmt, markdown_table, out_dir, parse_dtype,
                     parse_list, pick_device, stop_on_sigterm)

RUN_MODES = ("", "+graphs", "+compile", "+compile-ro")
# peers side by side (fast, timm, fast+graphs, timm+graphs, ...): in tables, and in the order
# compiled rows run, so that a time limit cuts whole pairs
IMPLS = tuple(f"{side}{mode}" for mode in RUN_MODES for side in ("fast", "timm"))
# Compiled or eager implementations of every row; +graphs (a CUDA-graph replay) is for inference.
MAIN_IMPLS = ("fast", "fast+compile", "timm", "timm+compile")
EAGER_IMPLS = ("fast", "timm")
MODES = ("infer", "train")
# torch.compile's mode for each compiled implementation (None: torch's default)
COMPILE_MODES = {"+compile": None, "+compile-ro": "reduce-overhead"}


def peer(impl: str) -> Optional[str]:
    """timm run the way ``impl`` runs crossvit_fast (``fast+compile`` → ``timm+compile``)."""
    return "timm" + impl[len("fast"):] if impl.startswith("fast") else None


def run_mode(impl: str) -> str:
    """``impl`` without its side: ``""``, ``+graphs``, ``+compile`` or ``+compile-ro``."""
    return impl[impl.index("+"):] if "+" in impl else ""


@dataclass(frozen=True)
class Spec:
    """One row to measure."""
    variant: str
    mode: str
    dtype: str
    batch: int
    impl: str

    @property
    def compiled(self) -> bool:
        return run_mode(self.impl) in COMPILE_MODES


def expand(variants, modes, dtypes, batches, impls) -> List[Spec]:
    """Every combination of the given lists, as specs."""
    return [Spec(*combo) for combo in itertools.product(variants, modes, dtypes, batches, impls)]


# --preset gpu-quick: six model compilations (the expensive part), about 3 minutes on an H100;
# CUDA-graph replay for both inference rows.
# --preset compile-race: issue 11's targets, each against timm run the same way: the training
# step at 128 eager and compiled, inference at 256 in every mode, batch-1 latency under CUDA
# graphs; six compilations (the two training ones about 90 s each on an H100).
PRESETS: Dict[str, Callable[[], List[Spec]]] = {
    "gpu-quick": lambda: (
        expand(["crossvit_18_240"], ["infer"], ["bf16"], [256],
               ("fast", "fast+graphs", "fast+compile", "timm", "timm+graphs", "timm+compile"))
        + expand(["crossvit_tiny_240"], ["infer"], ["fp32"], [1],
                 ("fast", "fast+graphs", "fast+compile", "timm", "timm+graphs", "timm+compile"))
        + expand(["crossvit_18_240"], ["train"], ["bf16"], [128], MAIN_IMPLS)
        + expand(list_models(), ["infer"], ["bf16"], [64], EAGER_IMPLS)),  # eager sweep, no compile
    "compile-race": lambda: (
        expand(["crossvit_18_240"], ["train"], ["bf16"], [128], MAIN_IMPLS)
        + expand(["crossvit_18_240"], ["infer"], ["bf16"], [256], IMPLS)
        + expand(["crossvit_tiny_240"], ["infer"], ["fp32"], [1], ("fast+graphs", "timm+graphs"))),
    # issue 18's sweep: every variant's bf16 inference at 64, eager and compiled on both sides
    # (22 compilations: warm them in parallel first, scripts/gpu_check.sh's warm step)
    "variants-64": lambda: expand(list_models(), ["infer"], ["bf16"], [64], MAIN_IMPLS),
    # the default-mode compiled rows of compile-race alone (four compilations): a short GPU call
    "compile-quick": lambda: (
        expand(["crossvit_18_240"], ["train"], ["bf16"], [128], ("fast+compile", "timm+compile"))
        + expand(["crossvit_18_240"], ["infer"], ["bf16"], [256], ("fast+compile", "timm+compile"))),
}


def load_timm() -> Tuple[Optional[object], Optional[str]]:
    """timm, or None and the reason it cannot be imported here.

    Where torchvision is missing, tests/timm_import.py's stand-in answers timm's torchvision
    imports (CrossViT uses none of them), as the parity tests do.
    """
    if importlib.util.find_spec("timm") is None:
        return None, "timm is not installed (pip install --no-deps timm pillow pyyaml)"
    try:
        if importlib.util.find_spec("torchvision") is None:
            from tests.timm_import import _TorchvisionStandIn
            if not any(isinstance(f, _TorchvisionStandIn) for f in sys.meta_path):
                sys.meta_path.insert(0, _TorchvisionStandIn())
        import timm
        return timm, None
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to leave timm out
        return None, f"timm could not be imported: {type(err).__name__}: {err}"


def build_model(spec: Spec, timm, weights: Optional[Dict[str, torch.Tensor]] = None) -> torch.nn.Module:
    """An fp32 model of ``spec.variant``: crossvit_fast's or timm's, random (seeded), or with
    ``weights`` loaded strictly (a timm model's: the two sides of a comparison compute alike)."""
    torch.manual_seed(0)
    model = timm.create_model(spec.variant) if spec.impl.startswith("timm") else crossvit_fast.create_model(spec.variant)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    return model


def wrap_model(model: torch.nn.Module, spec: Spec, settings) -> torch.nn.Module:
    """``model`` as ``spec.impl`` runs it: compiled, CUDA-graph replayed, or as is."""
    mode = run_mode(spec.impl)
    if spec.compiled:
        options = dict(settings.compile_options)
        if COMPILE_MODES[mode] is not None:
            options["mode"] = COMPILE_MODES[mode]
        return torch.compile(model, **options)
    if mode == "+graphs":   # the same capture for timm's model and ours
        return crossvit_fast.GraphedInference(model.eval())
    return model


def count_flops(variant: str, timm) -> Dict[str, object]:
    """FLOPs per image of inference (forward) and of a training step (forward and backward).

    Counted with FlopCounterMode on the meta device (nothing is computed): on timm's model where
    timm imports, else on crossvit_fast's model under ``naive_math`` (timm's math, op for op).
    """
    counts = {}
    with torch.device("meta"), naive_math():
        model = timm.create_model(variant) if timm is not None else crossvit_fast.create_model(variant)
        x = torch.empty(1, *model.pretrained_cfg["input_size"])
        for mode in MODES:
            with FlopCounterMode(display=False) as counter:
                out = model(x)
                if mode == "train":
                    out.sum().backward()
            counts[mode] = counter.get_total_flops()
    counts["source"] = "timm" if timm is not None else "crossvit_fast naive math"
    return counts


def step_inputs(spec: Spec, device: torch.device, input_size) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch ``(images, labels)`` for ``spec`` (seeded: each side of a comparison
    gets the same one)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(spec.batch, *input_size, generator=generator)
    labels = torch.randint(0, 1000, (spec.batch,), generator=generator)
    return x.to(device), labels.to(device)


def step_function(model: torch.nn.Module, spec: Spec, device: torch.device, base: torch.nn.Module,
                  inputs: Tuple[torch.Tensor, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One inference forward (returning the logits) or one training step (returning the loss
    before its update) of ``model`` (``base`` as wrapped by :func:`wrap_model`) on ``inputs``."""
    dtype = parse_dtype(spec.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    x, labels = inputs
    # CUDA-graph trees replay into the same output buffers: each step starts a new generation
    new_step = (torch.compiler.cudagraph_mark_step_begin if COMPILE_MODES.get(run_mode(spec.impl))
                else lambda: None)
    if spec.mode == "infer":
        base.eval()

        def infer():
            new_step()
            with torch.no_grad(), autocast:
                return model(x)
        return infer

    base.train()
    labels = labels % base.num_classes
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train():
        new_step()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return train


@dataclass
class Settings:
    """One run of the study, every default filled in."""
    device: torch.device
    specs: List[Spec]
    preset: Optional[str]
    warmup: int
    iters: int
    compile_options: Dict[str, str]
    compile_budget_s: Optional[float]
    matmul_n: int
    smoke: bool
    back_to_back_steps: int
    rounds: int

    def config(self) -> dict:
        """The settings as recorded in the results."""
        return dict(smoke=self.smoke, preset=self.preset, device=str(self.device), warmup=self.warmup,
                    iters=self.iters, compile=self.compile_options, compile_budget_s=self.compile_budget_s,
                    fused_backend=backends.resolve(None, self.device), optimizer="AdamW",
                    back_to_back_steps=self.back_to_back_steps, rounds=self.rounds,
                    # torch's per-backend API: allow_tf32 raises once a program has used it
                    matmul_fp32_precision=torch.backends.cuda.matmul.fp32_precision,
                    cudnn_conv_fp32_precision=torch.backends.cudnn.conv.fp32_precision,
                    specs=[asdict(s) for s in self.specs])


def first_step(base: torch.nn.Module, spec: Spec, settings: Settings,
               inputs: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[Callable[[], torch.Tensor], float, torch.Tensor]:
    """``spec``'s step function of ``base`` (moved to the device and wrapped), the seconds its
    first call took (for a compiled row, the compilation) and that call's output, copied (a
    CUDA-graph replay writes the next one over it)."""
    device = settings.device
    base = base.to(device)
    step = step_function(wrap_model(base, spec, settings), spec, device, base, inputs)
    start = time.perf_counter()
    output = step().detach().float().clone()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return step, time.perf_counter() - start, output


def groups_of(specs: List[Spec]) -> List[List[Spec]]:
    """``specs`` in their order, each crossvit_fast row together with its timm peer where that
    is among them (timm's first: its weights are loaded into ours), the others alone."""
    def partner(spec: Spec) -> Spec:
        side = peer(spec.impl) or "fast" + spec.impl[len("timm"):]
        return Spec(spec.variant, spec.mode, spec.dtype, spec.batch, side)

    left, groups = list(specs), []
    while left:
        spec = left.pop(0)
        other = partner(spec) if partner(spec) in left else None
        if other is None:
            groups.append([spec])
            continue
        left.remove(other)
        groups.append(sorted([spec, other], key=lambda s: not s.impl.startswith("timm")))
    return groups


# How far the logits (or first loss) of a crossvit_fast row may be from its timm peer's, same
# weights and batch, relative to their largest magnitude, before the table flags the row: far
# above rounding (bf16 autocast differs by a few percent on random weights, fp32 by TF32's
# rounding in timm's cuDNN convolution), far below a path that computes something else.
OUTPUT_DIFF_BAR = {"fp32": 1e-2, "bf16": 0.1, "fp16": 0.1}


def output_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours − theirs| / max |theirs|, in float64."""
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


def _dynamo_counts() -> Tuple[int, int]:
    """(graphs dynamo has compiled, graph breaks it has taken) so far."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


class Runner:
    """Measures specs group by group (a row and its peer together), keeping the FLOP counts and
    the compile seconds spent."""

    def __init__(self, settings: Settings, run_peaks: dict, timm, timm_reason: Optional[str]):
        self.settings, self.peaks = settings, run_peaks
        self.timm, self.timm_reason = timm, timm_reason
        self.flops: Dict[str, dict] = {}
        self.compile_spent_s = 0.0

    def skip_reason(self, spec: Spec) -> Optional[str]:
        """Why ``spec`` is not measured, or None."""
        budget = self.settings.compile_budget_s
        if spec.impl.startswith("timm") and self.timm is None:
            return self.timm_reason
        if run_mode(spec.impl) == "+graphs" and (spec.mode != "infer" or self.settings.device.type != "cuda"):
            return "CUDA-graph replay is for inference on a CUDA device"
        if spec.compiled and budget is not None and self.compile_spent_s >= budget:
            return f"compile budget of {budget:g} s spent"
        return None

    def measure_group(self, specs: List[Spec]) -> Tuple[List[dict], List[Tuple[Spec, str]]]:
        """Time ``specs`` (from :func:`groups_of`) as one comparison: the same weights and batch;
        each's first call (the compilation), warm-up and synchronized calls; then their
        back-to-back rounds interleaved; then their GPU time (the profiler last: it slows the
        host after it has run). Returns the rows and the specs left out, with why. A row
        records the graphs and graph breaks of its compilation, graphs compiled after it (in
        its own warm-up and timed calls, or in the group's interleaved rounds), how often inductor left CUDA graphs out (``reduce-overhead``) and how far its
        output is from its peer's."""
        device, settings = self.settings.device, self.settings
        torch._dynamo.reset()  # each group compiles afresh: no recompile limit across groups
        runs, skipped, weights, inputs = {}, [], None, None
        for spec in specs:
            reason = self.skip_reason(spec)
            if reason is None:
                try:
                    base = build_model(spec, self.timm, weights)
                    if spec.impl.startswith("timm"):
                        weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
                    inputs = inputs or step_inputs(spec, device, base.pretrained_cfg["input_size"])
                    runs[spec] = self._warm_and_time(spec, base, inputs)
                    continue
                except torch.cuda.OutOfMemoryError:
                    reason = "out of memory"
                except Exception as err:  # noqa: BLE001 - one failing row must not end the study
                    reason = f"failed: {type(err).__name__}: {str(err)[:300]}"
                    print(f"e2e: {spec} {reason}", file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # an OOM must not leave the next row short of memory
            skipped.append((spec, reason))
        if not runs:
            return [], skipped
        graphs_before = _dynamo_counts()[0]
        try:
            rounds = interleaved_rounds({spec: run["step"] for spec, run in runs.items()}, device,
                                        steps=settings.back_to_back_steps, rounds=settings.rounds)
            graphs_in_rounds = _dynamo_counts()[0] - graphs_before
            # host time left out; kernels replayed from a CUDA graph may not be seen by the
            # profiler (then 0, shown as —)
            gpu_s = {spec: kernel_time(run["step"], device, iters=3) for spec, run in runs.items()}
        except Exception as err:  # noqa: BLE001 - one failing comparison must not end the study
            reason = ("out of memory" if isinstance(err, torch.cuda.OutOfMemoryError)
                      else f"failed while timed: {type(err).__name__}: {str(err)[:300]}")
            print(f"e2e: {list(runs)} {reason}", file=sys.stderr)
            return [], skipped + [(spec, reason) for spec in runs]
        outputs = {spec.impl: run["output"] for spec, run in runs.items()}
        rows = []
        for spec, run in runs.items():
            theirs = outputs.get(peer(spec.impl))
            rows.append(self._row(spec, run, rounds[spec], gpu_s[spec],
                                  run["graphs_while_timed"] + graphs_in_rounds,
                                  None if theirs is None else output_difference(run["output"], theirs)))
        return rows, skipped

    def _warm_and_time(self, spec: Spec, base: torch.nn.Module, inputs) -> dict:
        """``spec``'s first call, then its warm-up and synchronized calls (latency), with what
        its compilation made and its peak memory."""
        device, settings = self.settings.device, self.settings
        skips_before, (graphs_before, breaks_before) = _cudagraph_skips(), _dynamo_counts()
        step, first_call_s, output = first_step(base, spec, settings, inputs)
        graphs, breaks = (now - before for now, before in zip(_dynamo_counts(), (graphs_before, breaks_before)))
        if spec.compiled:
            self.compile_spent_s += first_call_s
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        graphs_after_first = _dynamo_counts()[0]
        stats = summarize(time_fn(step, device, warmup=settings.warmup, iters=settings.iters))
        graphs_while_timed = _dynamo_counts()[0] - graphs_after_first
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        skips = _cudagraph_skips() - skips_before if run_mode(spec.impl) == "+compile-ro" else None
        return dict(step=step, output=output, first_call_s=first_call_s, stats=stats, peak=peak,
                    cudagraph_skips=skips, graphs=graphs if spec.compiled else None,
                    graph_breaks=breaks if spec.compiled else None, graphs_while_timed=graphs_while_timed)

    def _row(self, spec: Spec, run: dict, rounds: List[float], gpu_s: Optional[float],
             graphs_while_timed: int, output_diff: Optional[float]) -> dict:
        """The result row of ``spec``."""
        back_to_back_s = statistics.median(rounds)
        if spec.variant not in self.flops:
            self.flops[spec.variant] = count_flops(spec.variant, self.timm)
        flops = self.flops[spec.variant][spec.mode] * spec.batch
        tflops = flops / back_to_back_s / 1e12
        return dict(asdict(spec), images_per_s=spec.batch / back_to_back_s, **run["stats"],
                    cudagraph_skips=run["cudagraph_skips"], graphs=run["graphs"],
                    graph_breaks=run["graph_breaks"], graphs_while_timed=graphs_while_timed,
                    output_diff_vs_peer=output_diff,
                    back_to_back_s=back_to_back_s, back_to_back_rounds_s=rounds, gpu_s=gpu_s,
                    first_call_s=run["first_call_s"], peak_memory_bytes=run["peak"],
                    flops_per_image=self.flops[spec.variant][spec.mode],
                    flops_source=self.flops[spec.variant]["source"], TFLOPs=tflops,
                    flop_fraction=tflops / self.peaks["matmul"][spec.dtype]["TFLOPs"])


def _cudagraph_skips() -> int:
    """How often inductor has left CUDA graphs out of a ``reduce-overhead`` graph so far."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def warm_compile_cache(settings: Settings, timm, shard: int, shards: int) -> None:
    """Compile every ``shards``-th compiled row (from ``shard``) and run its first step, timing
    nothing and writing no results. Run as ``shards`` processes side by side before a timed run,
    it fills inductor's on-disk caches (FX graph, AOTAutograd, Triton), so that the timed run's
    compilations are cache hits and cost dynamo's tracing alone (scripts/gpu_check.sh, ``warm``)."""
    compiled = [spec for spec in settings.specs if spec.compiled]
    for spec in compiled[shard::shards]:
        torch._dynamo.reset()
        base = build_model(spec, timm)
        step, seconds, _ = first_step(base, spec, settings,
                                      step_inputs(spec, settings.device, base.pretrained_cfg["input_size"]))
        print(f"warmed {spec} in {seconds:.1f} s", flush=True)
        del step
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()


def parse_shard(text: str) -> Tuple[int, int]:
    """``"K/N"`` → (K, N) with 0 <= K < N."""
    try:
        shard, shards = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/6), got {text!r}") from None
    if not 0 <= shard < shards:
        raise argparse.ArgumentTypeError(f"expected 0 <= K < N in K/N, got {text!r}")
    return shard, shards


def key(row: dict) -> tuple:
    return row["variant"], row["mode"], row["dtype"], row["batch"]


def add_speedups(rows: List[dict]) -> None:
    """Each row's back-to-back speedup over its peer (timm run the same way), over timm eager and
    over fast eager, at the same variant, mode, dtype and batch; None where that row is missing."""
    times = {(key(r), r["impl"]): r["back_to_back_s"] for r in rows}
    for row in rows:
        for column, impl in (("vs_peer", peer(row["impl"])), ("vs_timm", "timm"), ("vs_fast", "fast")):
            ref = times.get((key(row), impl))
            row[column] = None if ref is None else ref / row["back_to_back_s"]


HEADERS = ["variant", "mode", "dtype", "batch", "impl", "img/s", "back-to-back ms", "latency ms",
           "p10–p90 ms", "GPU ms", "vs peer", "vs timm", "vs fast", "first call s", "peak MiB", "TFLOP/s",
           "% matmul peak"]


def row_notes(row: dict) -> List[str]:
    """What makes ``row`` other than its name says: CUDA graphs left out, graph breaks, graphs
    compiled while it was timed, an output far from its peer's."""
    notes = []
    if row.get("cudagraph_skips"):
        notes.append(f"CUDA graphs skipped {row['cudagraph_skips']}x")
    if row.get("graph_breaks"):
        notes.append(f"{row['graph_breaks']} graph breaks")
    if row.get("graphs_while_timed"):
        notes.append(f"{row['graphs_while_timed']} graphs compiled while timed")
    diff = row.get("output_diff_vs_peer")
    if diff is not None and diff > OUTPUT_DIFF_BAR[row["dtype"]]:
        notes.append(f"output differs from its peer's by {diff:.2g}")
    return notes


def table_row(row: dict) -> List[str]:
    """One result row as Markdown cells."""
    speedup = lambda v: fmt(v, ".2f") + ("x" if v is not None else "")  # noqa: E731
    peak = row["peak_memory_bytes"]
    impl = row["impl"] + "".join(f" ({note})" for note in row_notes(row))
    return [row["variant"], row["mode"], row["dtype"], row["batch"], impl, f"{row['images_per_s']:.1f}",
            f"{row['back_to_back_s'] * 1e3:.2f}", f"{row['median_s'] * 1e3:.2f}",
            f"{row['p10_s'] * 1e3:.2f}–{row['p90_s'] * 1e3:.2f}",
            fmt(row["gpu_s"] * 1e3 if row.get("gpu_s") else None, ".2f"), speedup(row.get("vs_peer")),
            speedup(row["vs_timm"]), speedup(row["vs_fast"]), f"{row['first_call_s']:.1f}",
            fmt(None if peak is None else peak / 2 ** 20, ".0f"), f"{row['TFLOPs']:.2f}",
            f"{100 * row['flop_fraction']:.1f}%"]


def markdown(results: StudyResults) -> str:
    """The results file's Markdown: environment, peaks, settings, the table, what was left out."""
    payload = results.payload
    config, rows = payload["config"], payload["rows"]
    matmuls = ", ".join(f"{name} {m['TFLOPs']:.2f} TFLOP/s" for name, m in payload["peaks"]["matmul"].items())
    ordered = sorted(rows, key=lambda r: (*key(r), IMPLS.index(r["impl"])))
    skipped = [f"- {s['variant']} {s['mode']} {s['dtype']} batch {s['batch']} {s['impl']}: {s['reason']}"
               for s in payload["skipped"]]
    return "\n".join([
        f"# End-to-end throughput on {payload['environment']['device']}", "",
        *environment_lines(payload["environment"]), "",
        f"Measured matmul peak (this run, n={config['matmul_n']}): {matmuls}. Fused backend "
        f"{config['fused_backend']}; torch.compile {config['compile']}, compile budget {config['compile_budget_s']} s "
        f"(spent {payload.get('compile_spent_s', 0):.0f} s); {config['warmup']} warm-up + {config['iters']} "
        f"synchronized runs (latency) and {config.get('rounds', 3)} rounds of {config['back_to_back_steps']} "
        f"steps back to back, a row's rounds interleaved with its peer's (img/s, vs columns); each "
        f"crossvit_fast row runs timm's weights on its peer's batch; training step: forward, cross-entropy, backward, {config['optimizer']}; "
        f"bf16/fp16 rows run under autocast. FLOPs: {payload['flops_source']}."
        + (" (smoke run)" if config["smoke"] else "")
        + (f" **Incomplete: {payload['stopped']}.**" if payload.get("stopped") else ""),
        "", markdown_table(HEADERS, [table_row(r) for r in ordered]),
        *(["", "## Left out", "", *skipped] if skipped else []),
    ])


def draw(plt, rows: List[dict]):
    """Images/s per configuration (log scale), one bar per implementation."""
    groups = list(dict.fromkeys(key(r) for r in rows))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(groups) + 1.5))
    height = 0.8 / len(IMPLS)
    for k, impl in enumerate(IMPLS):
        by_key = {key(r): r["images_per_s"] for r in rows if r["impl"] == impl}
        ys = [i + k * height for i, g in enumerate(groups) if g in by_key]
        ax.barh(ys, [by_key[g] for g in groups if g in by_key], height=height, label=impl)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(groups))])
    ax.set_yticklabels([f"{v} {m} {d} B={b}" for v, m, d, b in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="images/s")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def settings_from(args: argparse.Namespace) -> Settings:
    """Fill the defaults that depend on ``--smoke``, ``--preset`` and the device."""
    device = pick_device(args.device, args.smoke)
    gpu, smoke = device.type == "cuda", args.smoke
    if args.preset:
        specs = PRESETS[args.preset]()
    else:
        variants = args.variants or ("crossvit_tiny_240" if smoke else "crossvit_18_240")
        specs = expand(list_models() if variants == "all" else parse_list(variants),
                       parse_list(args.modes or ",".join(MODES)),
                       parse_list(args.dtypes or ("bf16" if gpu else "fp32")),
                       parse_list(args.batch_sizes or ("1" if smoke else "64" if gpu else "8"), int),
                       parse_list(args.impls or (",".join(EAGER_IMPLS) if smoke else ",".join(IMPLS))))
    for spec in specs:  # clear errors before anything runs
        parse_dtype(spec.dtype)
        if spec.variant not in list_models() or spec.mode not in MODES or spec.impl not in IMPLS:
            raise SystemExit(f"unknown variant, mode or impl in {spec}; variants: {', '.join(list_models())}; "
                             f"modes: {', '.join(MODES)}; impls: {', '.join(IMPLS)}")
    compile_options = {"backend": args.compile_backend or ("aot_eager" if smoke else "inductor")}
    if args.compile_mode:
        compile_options["mode"] = args.compile_mode
    default_budget = 400.0 if args.preset in ("compile-race", "compile-quick", "variants-64") else 100.0
    budget = args.compile_budget_s if args.compile_budget_s is not None else (default_budget if gpu else None)
    return Settings(
        device=device, specs=sorted(specs, key=lambda s: s.compiled),  # eager first; stable otherwise
        preset=args.preset,
        warmup=args.warmup if args.warmup is not None else (2 if smoke else 3),
        iters=args.iters if args.iters is not None else (2 if smoke else 20 if gpu else 5),
        compile_options=compile_options, compile_budget_s=None if budget is not None and budget < 0 else budget,
        matmul_n=512 if smoke else 8192 if gpu else 1024, smoke=smoke,
        back_to_back_steps=args.steps if args.steps is not None else (2 if smoke else 10),
        rounds=3 if smoke else 6)


def study_name(settings: Settings) -> str:
    """The results' file stem: ``e2e`` (``e2e-smoke`` for a smoke run), ``e2e-<preset>`` for a
    preset other than gpu-quick, so that one GPU run can write both."""
    if settings.smoke:
        return "e2e-smoke"
    return "e2e" if settings.preset in (None, "gpu-quick") else f"e2e-{settings.preset}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="crossvit_tiny_240, batch 1, fp32, eager only, 2 timed runs, on the CPU; "
                             "with --impls, compiled rows use aot_eager")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="gpu-quick: crossvit_18_240 bf16 inference at 256 and training at 128, "
                             "crossvit_tiny_240 fp32 batch-1 latency (eager, +graphs for inference, "
                             "+compile), and an eager sweep of all 11 variants at bf16 batch 64; "
                             "compile-race: crossvit_18_240 bf16 training at 128 (eager, +compile) and "
                             "inference at 256 (every impl), crossvit_tiny_240 fp32 batch 1 (+graphs), "
                             "compile budget 400 s; compile-quick: compile-race's four default-mode compiled rows; "
                             "variants-64: all 11 variants' bf16 inference at 64, eager and compiled "
                             "(replaces --variants/--modes/--dtypes/--batch-sizes/--impls)")
    parser.add_argument("--device", default=None, help="auto (CUDA if present; CPU with --smoke), cpu, cuda, cuda:N")
    parser.add_argument("--variants", default=None,
                        help="comma-separated, or 'all' (default crossvit_18_240; crossvit_tiny_240 with --smoke)")
    parser.add_argument("--modes", default=None, help="comma-separated from infer,train (default both)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated from fp32,bf16,fp16; bf16/fp16 run under autocast "
                             "(default bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 64 on CUDA, 8 on CPU, 1 with --smoke)")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated from {','.join(IMPLS)} (default all; fast,timm with --smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 3; 2 with --smoke)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row (default 20 on CUDA, 5 on CPU, 2 with --smoke)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per back-to-back round, 3 rounds (default 10; 2 with --smoke)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager with --smoke)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the +compile rows (default: torch's default; "
                             "+compile-ro rows always use reduce-overhead)")
    parser.add_argument("--compile-budget-s", type=float, default=None,
                        help="seconds of compilation after which compiled rows are left out "
                             "(default 100 on CUDA, none elsewhere; negative: none)")
    parser.add_argument("--warm-compile", type=parse_shard, default=None, metavar="K/N",
                        help="only compile the compiled rows K, K+N, K+2N, ... and run their first step, "
                             "to fill inductor's caches for a later timed run (N processes side by side)")
    parser.add_argument("--out", default=None,
                        help="results folder (default bench/results; a temporary folder with --smoke)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from tqdm import tqdm
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    stop_on_sigterm()
    timm, timm_reason = load_timm()
    if args.warm_compile is not None:
        warm_compile_cache(settings, timm, *args.warm_compile)
        return 0
    timing = dict(warmup=max(settings.warmup, 3), iters=max(settings.iters, 5))
    run_peaks = dict(matmul={name: peaks.matmul_peak(settings.device, settings.matmul_n, parse_dtype(name), **timing)
                             for name in dict.fromkeys(s.dtype for s in settings.specs)})
    config = dict(settings.config(), matmul_n=settings.matmul_n)
    results = StudyResults(out_dir(args.out, settings.smoke), study_name(settings),
                           settings.device, config, peaks=run_peaks, timm=timm_reason or "imported",
                           flops_source="timm's model (FlopCounterMode, meta device)" if timm is not None
                           else "crossvit_fast's model under naive_math (timm not importable)", skipped=[])
    runner = Runner(settings, run_peaks, timm, timm_reason)
    load_profiler(settings.device)   # before any timing: its lasting cost falls on every row alike
    groups = groups_of(settings.specs)
    measured = 0
    try:
        for group in tqdm(groups, desc="e2e", unit="comparison", file=sys.stderr):
            rows, skipped = runner.measure_group(group)
            for row in rows:
                results.add(row)
            for spec, reason in skipped:
                results.payload["skipped"].append(dict(asdict(spec), reason=reason))
            measured += 1
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()   # the next comparison starts with the memory free
    except Stopped as stop:
        results.stop(str(stop))
        for spec in (spec for group in groups[measured:] for spec in group):
            results.payload["skipped"].append(dict(asdict(spec), reason=f"not reached ({stop})"))
    add_speedups(results.payload["rows"])
    results.payload["compile_spent_s"] = runner.compile_spent_s
    text = markdown(results)
    written = results.finish(text, draw)
    print(text[text.index("| variant"):])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
