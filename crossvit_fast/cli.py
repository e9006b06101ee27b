"""``crossvit-fast``: info, check (fused vs naive), bench (images/s), build-ext, attention (maps PNG)."""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import __version__, backends
from .benchmarking import environment, summarize, time_fn
from .reference import naive_math
from .variants import create_model, list_models

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Whole-model bars (worst relative error against the float64 naive model).
DEFAULT_TOL = {"fp32": 1e-4, "bf16": 6e-2, "fp16": 1e-2}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


def _usable_backends(device: torch.device) -> List[str]:
    return [b for b in backends.CONCRETE_BACKENDS if backends.unavailable_reason(b, device) is None]


def _table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _image(model, batch: int, device, dtype, seed: int = 0) -> torch.Tensor:
    size = model.pretrained_cfg["input_size"][-1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, model.in_chans, size, size, generator=gen).to(device, dtype)


def cmd_info(args) -> int:
    print(f"crossvit-fast {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    print(f"triton: {env['triton']}")
    print(f"device: {env['device']}" + ("" if torch.cuda.is_available() else " (no CUDA device)"))
    print(f"requested backend: {backends.get_backend()} (set with {backends.ENV_VAR} or set_backend)")
    print("backends:")
    for name, per_device in backends.status().items():
        for dev, reason in per_device.items():
            print(f"  {name:7s} on {dev:5s}: {'usable' if reason is None else 'unavailable: ' + reason}")
    return 0


def _outputs(model, x) -> Dict[str, torch.Tensor]:
    feats = model.forward_features(x)
    return {"logits": model.forward_head(feats), "features[0]": feats[0], "features[1]": feats[1]}


def _param_grads(model, x, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (model(x).double() * weights).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def cmd_check(args) -> int:
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    tol = args.tol if args.tol is not None else DEFAULT_TOL[args.dtype]
    torch.manual_seed(args.seed)
    model = create_model(args.model).to(device).eval()
    reference = copy.deepcopy(model).double()
    x = _image(model, args.batch, device, torch.float64, args.seed)
    weights = torch.randn(args.batch, model.num_classes, dtype=torch.float64, device=device)
    with naive_math():
        with torch.no_grad():
            expected = _outputs(reference, x)
        expected_grads = _param_grads(reference, x, weights)
    fast = model.to(dtype)
    rows, worst = [], 0.0
    chosen = args.backends.split(",") if args.backends else _usable_backends(device)
    for backend in chosen:
        backends.resolve(backend, device)  # a clear error if it cannot run here
        with backends.use_backend(backend):
            with torch.no_grad():
                got = _outputs(fast, x.to(dtype))
            grads = _param_grads(fast, x.to(dtype), weights)
        errors = {name: _rel(got[name], expected[name]) for name in expected}
        errors["param grads (worst)"] = max(_rel(grads[n], g) for n, g in expected_grads.items())
        for name, err in errors.items():
            worst = max(worst, err)
            rows.append([backend, name, f"{err:.2e}", f"{tol:.0e}", "ok" if err <= tol else "FAIL"])
    print(f"{args.model} {args.dtype} batch {args.batch} on {device}: fused model vs the naive "
          f"float64 reference (relative error)")
    print(_table(["backend", "output", "rel err", "bar", ""], rows))
    if worst > tol:
        print(f"FAIL: worst relative error {worst:.2e} exceeds the bar {tol:.0e}")
        return 1
    print(f"ok: worst relative error {worst:.2e} within {tol:.0e}")
    return 0


def cmd_bench(args) -> int:
    from tqdm import tqdm
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    sizes = [int(s) for s in (args.batch_sizes or ("1,32,256" if device.type == "cuda" else "1,4,16")).split(",")]
    model = create_model(args.model).to(device, dtype).eval()
    backend = backends.resolve(None, device)
    plan = [(bs, impl) for bs in sizes for impl in ("naive", "fused")]
    results = []
    with torch.inference_mode():
        for bs, impl in tqdm(plan, desc=f"bench {args.model}", unit="run", file=sys.stderr):
            x = _image(model, bs, device, dtype)
            with naive_math(impl == "naive"):
                times = time_fn(lambda: model(x), device, warmup=args.warmup, iters=args.iters)
            stats = summarize(times)
            results.append(dict(batch=bs, impl=impl, backend="naive" if impl == "naive" else backend,
                                images_per_s=bs / stats["median_s"], **stats))
    rows = []
    for bs in sizes:
        naive, fused = (next(r for r in results if r["batch"] == bs and r["impl"] == i) for i in ("naive", "fused"))
        rows.append([bs, f"{naive['images_per_s']:.1f}", f"{fused['images_per_s']:.1f}",
                     f"{fused['images_per_s'] / naive['images_per_s']:.2f}x"])
    env = environment(device)
    print(f"{args.model} {args.dtype} inference on {env['device']} (fused backend: {backend}); "
          f"median of {args.iters} runs after {args.warmup} warm-up")
    print(_table(["batch", "naive img/s", "fused img/s", "speedup"], rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(environment=env, model=args.model, dtype=args.dtype,
                                                   mode="inference", results=results), indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_attention(args) -> int:
    from .attention_viz import draw_attention   # matplotlib: only this command needs it
    width, height = draw_attention(args.image, args.model, args.out, checkpoint=args.checkpoint,
                                   heads=args.heads, device=_device(args.device),
                                   dtype=DTYPES[args.dtype])
    print(f"wrote {args.out} ({width}x{height} pixels)")
    return 0


def cmd_build_ext(args) -> int:
    from ._extension import build_extension
    try:
        build_extension(verbose=True)
    except RuntimeError as err:   # the compiler's output was printed above
        print(f"crossvit-fast build-ext: {err}", file=sys.stderr)
        return 1
    print("crossvit_fast CUDA extension built")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossvit-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends are usable (and why not)")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="crossvit_tiny_240", choices=list_models(), metavar="NAME",
                        help="variant name (default: crossvit_tiny_240)")
    common.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    common.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))

    check = sub.add_parser("check", parents=[common], help="fused model vs the naive float64 reference")
    check.add_argument("--batch", type=int, default=2)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--tol", type=float, default=None, help="bar on the worst relative error")
    check.add_argument("--backends", default=None, help="comma-separated (default: every usable one)")

    bench = sub.add_parser("bench", parents=[common], help="images/s: fused vs naive model, inference")
    bench.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,32,256 on CUDA, 1,4,16 on CPU)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--iters", type=int, default=5)
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")

    sub.add_parser("build-ext", help="build the CUDA C++ extension now instead of on first use")

    attention = sub.add_parser("attention", parents=[common],
                               help="draw each branch's CLS cross-attention over an image (PNG)")
    attention.add_argument("image", help="an image file (any format Pillow reads)")
    attention.add_argument("--checkpoint", default=None, metavar="PATH",
                           help="weights to load (default: random weights, labelled so)")
    attention.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    attention.add_argument("--heads", action="store_true", help="one heat map per head, not the mean")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "build-ext": cmd_build_ext,
               "attention": cmd_attention}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
