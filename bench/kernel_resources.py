"""Shared memory, registers, spills and programs per SM of every Triton kernel, compiled for NVIDIA
GPUs without one, at the launch parameters the model really passes.

The kernels' launch wrappers run on meta tensors (nothing is computed) with each launch recorded
instead of made: the kernel, its grid, its arguments. Each distinct launch is then compiled with
``triton.compile`` for sm_80 (A100), sm_86 (RTX 30xx, A10), sm_89 (RTX 40xx, L4) and sm_90 (H100,
H200), typed as inductor types a compiled model's launches (Python floats as fp64, pointers
16-byte aligned), and Triton's bundled ``cuobjdump`` reads the registers and the stack (spilled
registers) of the binary it made. A configuration
*fits* where its shared memory is within the GPU's per-block limit. ``--check`` fails where one
misses a target (:func:`violations`: not fitting, spilling, a token-pass launch under a full
wave from batch 8 up or under 4 programs per SM at batch 256); tests/test_kernel_resources.py runs
it in CI. The CUDA backend's shared-memory plan (bench.cuda_plan) goes in the same report.

Needs Triton's compiler, not its interpreter: run it in a process without ``TRITON_INTERPRET``.

    python -m bench.kernel_resources --batches 1,8,256 --out bench/results --check   # all 11 variants
    python -m bench.kernel_resources --variants crossvit_18_240 --modes bf16 --targets 90
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from crossvit_fast.layers import FUSED_CLS_EXCHANGE_MAX_BATCH

from . import cuda_plan
from .shapes import branches, op_cases

# (name, SMs of the representative part, shared memory a block may opt into, bytes)
TARGETS: Dict[int, Tuple[str, int, int]] = {
    80: ("A100", 108, 166912),
    86: ("RTX 3090 / A10", 82, 101376),
    89: ("RTX 4090 / L4", 128, 101376),
    90: ("H100 / H200", 132, 232448),
}
# The token pass's kernels (forward, backward, maps): from WAVE_FROM_BATCH samples up each launch
# is at least one full wave (a program per SM), and at batch 256 PROGRAMS_PER_SM_AT_256 per SM.
TOKEN_PASS_KERNELS = ("_scores_kernel", "_pool_fwd_kernel", "_token_bwd_kernel", "_pool_bwd_kernel")
WAVE_FROM_BATCH = 8
PROGRAMS_PER_SM_AT_256 = 4
# dtype modes: (token dtype, dot dtype of the token pass, LayerNorm residual dtype, output dtype)
MODES = {
    "fp32": (torch.float32, None, torch.float32, None),
    "bf16": (torch.bfloat16, None, torch.bfloat16, None),
    "autocast": (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
}
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64"}


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self, kernel, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append((self.kernel, grid, args, kwargs))
        return record


def _kernel_modules():
    from crossvit_fast.kernels import attn_pool, attn_weights, cls_exchange, cls_proj, layer_norm
    return attn_pool, attn_weights, cls_exchange, cls_proj, layer_norm


@contextlib.contextmanager
def recording(sms: int) -> Iterator[list]:
    """Every Triton kernel of crossvit_fast.kernels replaced by a recorder, and the SM count the
    grid heuristics read set to ``sms``; yields the list the launches go to."""
    from triton.runtime.jit import JITFunction
    sink: list = []
    saved = []
    for module in _kernel_modules():
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                saved.append((module, name, value))
        if hasattr(module, "num_sms"):
            saved.append((module, "num_sms", module.num_sms))
    try:
        for module, name, value in saved:
            setattr(module, name, (lambda device, n=sms: n) if name == "num_sms" else _Recorder(value, sink))
        yield sink
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def model_calls(variant: str, batch: int, mode: str) -> Iterator[Tuple[str, Callable[[], object]]]:
    """``(op, call)`` for each fused-op launch wrapper the model calls at ``batch`` in ``mode``,
    on meta tensors, at the op shapes of :func:`bench.shapes.op_cases`: the token pass forward,
    backward and maps of each fusion direction, the CLS projections, and the block LayerNorm
    (with residual) forward and backward of each branch, and the fused CLS exchange of each
    direction (inference, up to its batch limit)."""
    from crossvit_fast.kernels import attn_pool, attn_weights, cls_proj, layer_norm
    dtype, dot, res_dtype, out_dtype = MODES[mode]
    acc = torch.float32

    def empty(*shape, dtype=acc):
        return torch.empty(*shape, dtype=dtype, device="meta")

    for case in op_cases([variant]):
        C, H, N = case.c_in, case.heads, case.patches
        if case.op == "cross_attention":
            x0, p, kt, g = empty(batch, C, dtype=dtype), empty(batch, N, C, dtype=dtype), empty(batch, H, C), empty(C)
            z, lse = empty(batch, H, C), empty(batch, H)
            yield f"token pass fwd C{C} H{H}", partial(attn_pool.attn_pool_fwd, x0, p, kt, g, g, 1e-6, dot)
            yield f"token pass bwd C{C} H{H}", partial(attn_pool.attn_pool_bwd, z, x0, p, kt, g, g, z, lse, 1e-6, dot)
            yield f"maps C{C} H{H}", partial(attn_weights.attn_weights, x0, p, kt, g, g, lse, 1e-6, dot)
        elif case.op == "cls_projection":
            Cout = case.c_out
            x, w, lw, b, stat = empty(batch, C, dtype=dtype), empty(Cout, C), empty(C), empty(Cout), empty(batch)
            yield f"CLS projection fwd {C}->{Cout}", partial(cls_proj.cls_proj_fwd, x, lw, lw, w, b, 1e-6)
            yield f"CLS projection bwd {C}->{Cout}", partial(cls_proj.cls_proj_bwd, empty(batch, Cout, dtype=dtype),
                                                              x, lw, lw, w, stat, stat)
        else:   # add_layer_norm: the residual stream in fp32 under autocast, the branch output in bf16
            M = batch * (N + 1)
            x, r = empty(M, C, dtype=torch.float32 if mode == "autocast" else dtype), empty(M, C, dtype=res_dtype)
            w, stat = empty(C), empty(M)
            h = empty(M, C, dtype=torch.promote_types(x.dtype, r.dtype))
            yield f"add+LayerNorm fwd C{C}", partial(layer_norm.layer_norm_fwd, x, r, w, w, 1e-6, out_dtype)
            yield f"add+LayerNorm bwd C{C}", partial(layer_norm.layer_norm_bwd, empty(M, C, dtype=out_dtype or h.dtype),
                                                     h, h, w, stat, stat)
    if batch <= FUSED_CLS_EXCHANGE_MAX_BATCH:
        yield from _exchange_calls(variant, batch, dtype, empty, out_dtype)


def _exchange_calls(variant: str, batch: int, dtype: torch.dtype, empty,
                    linear_dtype: Optional[torch.dtype]) -> Iterator[Tuple[str, Callable[[], object]]]:
    """The fused CLS exchange of each direction of ``variant`` that the kernel takes, its
    Linears' outputs rounded to ``linear_dtype`` (autocast's; None: the tokens')."""
    from crossvit_fast.kernels import cls_exchange as ex
    for own, other in itertools.permutations(branches(variant)):
        Ci, Cj, H = own.width, other.width, other.heads
        if not ex.fits(Ci, Cj, H):
            continue
        def proj(c_in, c_out):
            return ex.Projection(empty(c_in, dtype=dtype), empty(c_in, dtype=dtype), 1e-6,
                                 empty(c_out, c_in, dtype=dtype), empty(c_out, dtype=dtype))
        w, v = empty(Cj, Cj, dtype=dtype), empty(Cj, dtype=dtype)
        attn = ex.CrossAttention(v, v, 1e-6, w, v, w, w, v, w, v, H, (Cj // H) ** -0.5)
        yield f"CLS exchange {Ci}->{Cj} H{H}", partial(
            ex.cls_exchange, empty(batch, Ci, dtype=dtype), empty(batch, other.patches, Cj, dtype=dtype),
            empty(batch, Ci, dtype=dtype), proj(Ci, Cj), attn, proj(Cj, Ci), linear_dtype)


def _signature(kernel, args, kwargs) -> Tuple[dict, dict, dict, dict]:
    """Triton's (signature, constexprs, attrs) for a launch, typed as inductor types it, and the
    launch options."""
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    bound = dict(zip(kernel.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in options})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp64"   # inductor's typing of a Python float
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs, attrs, options


def record_launches(variant: str, batch: int, mode: str, sms: int) -> List[Tuple[str, object, tuple, int]]:
    """``(op, kernel, (signature, constexprs, attrs, options), programs)`` of every launch."""
    out = []
    for op, call in model_calls(variant, batch, mode):
        with recording(sms) as sink:
            call()
        for kernel, grid, args, kwargs in sink:
            programs = 1
            for g in grid:
                programs *= int(g)
            out.append((op, kernel, _signature(kernel, args, kwargs), programs))
    return out


_RESOURCES = re.compile(r"Function (\w+):\s*REG:(\d+) STACK:(\d+)")


def compile_for(kernel, typed, cc: int) -> dict:
    """Compile one launch for compute capability ``cc``: shared bytes, registers, stack bytes.

    Registers and stack are read from the binary Triton made (``cuobjdump -res-usage`` of its
    cubin), not from a second ``ptxas -v`` of its PTX: Triton passes ptxas options of its own
    (Triton 3.9 ``--regAllocOptLevel=2``), so a second assembly can allocate differently, and a
    cached compilation costs no assembly at all. The stack of these kernels holds spilled
    registers only (no ``noinline`` helper, whose frame would count too)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, constexprs, attrs, options = typed
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", cc, 32), options=options)
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"crossvit-fast-{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink(missing_ok=True)
    name, registers, stack = _RESOURCES.search(usage).groups()
    assert name == kernel.__name__, (name, kernel.__name__)
    return dict(shared=compiled.metadata.shared, registers=int(registers), stack_bytes=int(stack))


def _freeze(typed) -> tuple:
    signature, constexprs, attrs, options = typed
    return (tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
            tuple((k, str(v)) for k, v in attrs.items()), tuple(options.items()))


def table(variants: List[str], batches: List[int], modes: List[str], targets: List[int]) -> List[dict]:
    """One row per (variant, batch, mode, op's kernel, target); each distinct compilation once."""
    compiled: Dict[tuple, dict] = {}
    rows = []
    for variant, batch, mode, cc in itertools.product(variants, batches, modes, targets):
        name, sms, smem = TARGETS[cc]
        for op, kernel, typed, programs in record_launches(variant, batch, mode, sms):
            key = (kernel.__name__, _freeze(typed), cc)
            if key not in compiled:
                compiled[key] = compile_for(kernel, typed, cc)
            res = compiled[key]
            rows.append(dict(variant=variant, batch=batch, mode=mode, op=op, kernel=kernel.__name__,
                             target=f"sm_{cc}", gpu=name, sms=sms, programs=programs,
                             programs_per_sm=programs / sms, fits=res["shared"] <= smem,
                             shared_limit=smem, **res))
    return rows


def violations(rows: List[dict]) -> List[str]:
    """Every configuration that misses issue 19's targets: shared memory over the GPU's limit,
    spilled registers, or a token-pass launch under a full wave from batch 8 up or under 4
    programs per SM at batch 256."""
    out = []
    for r in rows:
        where = f"{r['target']} {r['variant']} batch {r['batch']} {r['mode']} {r['op']}: {r['kernel']}"
        if not r["fits"]:
            out.append(f"{where} needs {r['shared']} B of shared memory (limit {r['shared_limit']})")
        if r["stack_bytes"]:
            out.append(f"{where} spills {r['stack_bytes']} B of stack ({r['registers']} registers)")
        if r["kernel"] in TOKEN_PASS_KERNELS:
            if r["batch"] >= WAVE_FROM_BATCH and r["programs"] < r["sms"]:
                out.append(f"{where} launches {r['programs']} programs, under a wave of {r['sms']}")
            if r["batch"] >= 256 and r["programs_per_sm"] < PROGRAMS_PER_SM_AT_256:
                out.append(f"{where} launches {r['programs_per_sm']:.2f} programs per SM "
                           f"(target {PROGRAMS_PER_SM_AT_256})")
    return out


def summary(rows: List[dict]) -> List[dict]:
    """Per kernel, dtype mode and target, over every variant, op and batch: how many
    configurations fit, the largest shared memory, registers and spills, and programs per SM."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["mode"], r["target"]), []).append(r)
    out = []
    for (kernel, mode, target), group in sorted(groups.items()):
        per_batch = {b: [r["programs_per_sm"] for r in group if r["batch"] == b] for b in sorted({r["batch"] for r in group})}
        out.append(dict(kernel=kernel, mode=mode, target=target, configurations=len(group),
                        fit=sum(r["fits"] for r in group), shared_limit=group[0]["shared_limit"],
                        max_shared=max(r["shared"] for r in group),
                        max_registers=max(r["registers"] for r in group),
                        spilling=sum(bool(r["stack_bytes"]) for r in group),
                        max_stack_bytes=max(r["stack_bytes"] for r in group),
                        programs_per_sm={b: (min(v), max(v)) for b, v in per_batch.items()},
                        not_fitting=sorted({f"{r['variant']} {r['op']}" for r in group if not r["fits"]})))
    return out


def cuda_plan_lines(plans: Dict[Tuple[int, int], dict]) -> List[str]:
    """The CUDA backend's token pass: dynamic shared memory per block at each (C, H), against
    each GPU's limit."""
    head = ["C", "H", "forward B", "backward B", *[f"fits sm_{cc} ({TARGETS[cc][2]})" for cc in TARGETS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (C, H), p in sorted(plans.items()):
        fits = ["yes" if max(p["fwd_bytes"], p["bwd_bytes"]) <= TARGETS[cc][2] else "no" for cc in TARGETS]
        lines.append("| " + " | ".join(map(str, [C, H, p["fwd_bytes"], p["bwd_bytes"], *fits])) + " |")
    return lines


def markdown(rows: List[dict], made_with: str, plans: Optional[Dict[Tuple[int, int], dict]] = None) -> str:
    """The summary table (every configuration is in the JSON), every miss of the targets, and the
    CUDA backend's plan where given; ``made_with``: Triton and commit."""
    bad = [r for r in rows if not r["fits"]]
    spilling = [r for r in rows if r["stack_bytes"]]
    misses = violations(rows)
    batches = sorted({r["batch"] for r in rows})
    head = ["kernel", "mode", "target", "fit", "max shared KB (limit)", "max regs", "spilling",
            "max stack B", *[f"programs/SM at batch {b}" for b in batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in summary(rows):
        cells = [g["kernel"], g["mode"], g["target"], f"{g['fit']}/{g['configurations']}",
                 f"{g['max_shared'] / 1024:.1f} ({g['shared_limit'] / 1024:.0f})", g["max_registers"],
                 g["spilling"], g["max_stack_bytes"],
                 *[f"{g['programs_per_sm'][b][0]:.2f}–{g['programs_per_sm'][b][1]:.2f}"
                   if b in g["programs_per_sm"] else "not launched" for b in batches]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    variants = sorted({r["variant"] for r in rows})
    text = [
        "# Triton kernels compiled for sm_80, sm_86, sm_89 and sm_90 (no GPU)", "",
        f"Made with {made_with}. {len(rows)} configurations ({len(variants)} variants, batch {', '.join(map(str, batches))}, "
        f"modes {', '.join(sorted({r['mode'] for r in rows}))}): {len(bad)} need more shared memory "
        f"than the GPU grants, {len(spilling)} spill registers, {len(misses)} miss a target (below). "
        "Programs per SM at the representative part's SM count (A100 108, RTX 3090 82, RTX 4090 128, "
        "H100 132); the token pass's kernels aim for a full wave from batch "
        f"{WAVE_FROM_BATCH} and {PROGRAMS_PER_SM_AT_256} programs per SM at batch 256. Every "
        "configuration is in kernel-resources.json; `python -m bench.kernel_resources --out DIR` "
        "makes both.", "",
        *lines, "", "Configurations that miss a target:", "", *(f"- {m}" for m in misses or ["none"])]
    if plans:
        text += ["", "## The CUDA backend's token pass (csrc/attn_pool_plan.h)", "",
                 "Dynamic shared memory per block at each variant's cross-attention width and heads, "
                 "computed by the header itself (bench.cuda_plan), against each GPU's per-block limit.",
                 "", *cuda_plan_lines(plans)]
    return "\n".join(text)


def main(argv: Optional[List[str]] = None) -> int:
    from crossvit_fast.variants import list_models
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_resources", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="all", help="comma-separated, or all (default)")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--modes", default=",".join(MODES), help=f"from {','.join(MODES)}")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 (listing them) where a configuration misses a target")
    parser.add_argument("--out", default=None, help="folder for kernel-resources.{json,md} (default: print only)")
    args = parser.parse_args(argv)
    from triton import knobs   # late, as this module imports Triton everywhere
    if knobs.runtime.interpret:
        raise SystemExit("bench.kernel_resources compiles the kernels: unset TRITON_INTERPRET")
    variants = list_models() if args.variants == "all" else args.variants.split(",")
    rows = table(variants, [int(b) for b in args.batches.split(",")], args.modes.split(","),
                 [int(t) for t in args.targets.split(",")])
    import triton
    from crossvit_fast.benchmarking import git_commit
    plans = None
    if cuda_plan.host_compiler():
        plans = cuda_plan.plan_table(sorted({(case.c_in, case.heads) for case in op_cases(variants)
                                             if case.op == "cross_attention"}))
    text = markdown(rows, f"Triton {triton.__version__} at commit {git_commit()}", plans)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel-resources.json").write_text(json.dumps(rows, indent=1))
        (out / "kernel-resources.md").write_text(text + "\n")
    print(text.split("\n")[2][:600])
    misses = violations(rows)
    if args.check and misses:
        print("\n".join(misses), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
