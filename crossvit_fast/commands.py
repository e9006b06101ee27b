"""What the ``crossvit-fast`` commands do, once :mod:`.cli` has parsed and checked the arguments."""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import __version__, backends
from .backends import BackendUnavailableError
from .benchmarking import DTYPES, environment, summarize, time_fn
from .checkpoint import CheckpointError
from .reference import naive_math
from .variants import create_model

# Whole-model bars (worst relative error against the float64 naive model); for bf16 and fp16 the
# least bar: each output's is LOWP_FACTOR x the error of timm's math itself in that dtype, where
# that is more (a pure-16-bit model's gradients are off by tens of percent in timm too).
DEFAULT_TOL = {"fp32": 1e-4, "bf16": 6e-2, "fp16": 1e-2}
LOWP_FACTOR = 4.0


class CommandError(Exception):
    """A failure the user can act on, found by a command; its message is the one line shown."""


# The commands that run no model: ``info`` reports a bad ``CROSSVIT_FAST_BACKEND`` (it is there to
# say what is wrong), ``build-ext`` builds the extension whatever the variable says. Every other
# command, present or added later, checks the variable before it does any work.
NO_MODEL_COMMANDS = ("info", "build-ext")


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit code."""
    handlers = {"info": info, "check": check, "bench": bench, "build-ext": build_ext,
                "attention": attention}
    if args.command not in NO_MODEL_COMMANDS:
        _check_backend_variable()
    return handlers[args.command](args)


def _check_backend_variable() -> None:
    """A CommandError (one line, exit code 1) where ``CROSSVIT_FAST_BACKEND`` holds no backend
    name; its message names the variable, the value and the accepted names."""
    try:
        backends.get_backend()
    except ValueError as err:
        raise CommandError(str(err)) from err


def expected_failure(err: Exception) -> Optional[str]:
    """The one-line message of a failure the user can act on; None for anything else (a bug,
    whose traceback the user should see)."""
    if _out_of_memory(err):
        return f"out of memory: {_first_line(err)} (try a smaller batch)"
    if isinstance(err, (CommandError, BackendUnavailableError, CheckpointError, OSError)):
        return _first_line(err)
    return None


def _out_of_memory(err: Exception) -> bool:
    # torch raises OutOfMemoryError on CUDA, a plain RuntimeError from the CPU allocator
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


def _device(name: str) -> torch.device:
    """The device ``--device`` names (``auto``: CUDA if present); a CommandError if it is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {name}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(f"--device {name}: expected an index below {torch.cuda.device_count()} "
                               f"(the number of CUDA devices here)")
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


def info(args) -> int:
    print(f"crossvit-fast {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    print(f"triton: {env['triton']}")
    print(f"device: {env['device']}" + ("" if torch.cuda.is_available() else " (no CUDA device)"))
    print(f"requested backend: {_requested_backend()} (set with {backends.ENV_VAR} or set_backend)")
    print("backends:")
    for name, per_device in backends.status().items():
        for dev, reason in per_device.items():
            print(f"  {name:7s} on {dev:5s}: {'usable' if reason is None else 'unavailable: ' + reason}")
    return 0


def _requested_backend() -> str:
    """The requested backend, or what is wrong with ``CROSSVIT_FAST_BACKEND``: ``info`` reports a
    bad value instead of failing on it."""
    try:
        return backends.get_backend()
    except ValueError as err:
        return f"none: {err}"


def _outputs(model, x) -> Dict[str, torch.Tensor]:
    feats = model.forward_features(x)
    return {"logits": model.forward_head(feats), **{f"features[{i}]": f for i, f in enumerate(feats)}}


def _param_grads(model, x, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (model(x).double() * weights).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _errors(model, x: torch.Tensor, weights: torch.Tensor, expected: Dict[str, torch.Tensor],
            expected_grads: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Relative error of each output of ``model`` on ``x`` (in its dtype) and of its worst
    parameter gradient, against the float64 reference's. A gradient is compared at least at
    1e-3 of the largest one's scale: ``wk``'s bias has none (the softmax cancels it), and its
    reference's rounding noise is no scale to divide by."""
    with torch.no_grad():
        got = _outputs(model, x)
    grads = _param_grads(model, x, weights)
    errors = {name: _rel(got[name], expected[name]) for name in expected}
    largest = max(g.abs().max().item() for g in expected_grads.values())
    errors["param grads (worst)"] = max(_rel(grads[n], g, floor=1e-3 * largest)
                                        for n, g in expected_grads.items())
    return errors


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(floor)).item()


def _checked_backends(requested: Optional[List[str]], device: torch.device) -> List[str]:
    """``--backends`` (every usable one if not given); a CommandError naming one that cannot run
    on ``device``, before any work is done."""
    if requested is None:
        return _usable_backends(device)
    for name in requested:
        try:
            backends.resolve(name, device)
        except BackendUnavailableError as err:
            raise CommandError(f"--backends {name}: {err}") from err
    return requested


def check(args) -> int:
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    tol = args.tol if args.tol is not None else DEFAULT_TOL[args.dtype]
    chosen = _checked_backends(args.backends, device)
    torch.manual_seed(args.seed)
    model = _model(args).to(device).eval()
    reference = copy.deepcopy(model).double()
    x = _image(model, args.batch, device, torch.float64, args.seed)
    with naive_math():
        with torch.no_grad():
            expected = _outputs(reference, x)
        weights = torch.randn(expected["logits"].shape, dtype=torch.float64, device=device)
        expected_grads = _param_grads(reference, x, weights)
    fast, x = model.to(dtype), x.to(dtype)
    own = None   # 16 bits without --tol: each output held to timm's math's own error in the dtype
    if args.tol is None and dtype != torch.float32:
        with naive_math():
            own = _errors(fast, x, weights, expected, expected_grads)
    rows, worst = [], (0.0, tol)   # (error, its bar) of the output furthest past or nearest it
    for backend in chosen:
        with backends.use_backend(backend):
            errors = _errors(fast, x, weights, expected, expected_grads)
        for name, err in errors.items():
            bar = tol if own is None else max(tol, LOWP_FACTOR * own[name])
            if not err / bar <= worst[0] / worst[1]:   # a NaN error is the worst
                worst = (err, bar)
            rows.append([backend, name, f"{err:.2e}", *([] if own is None else [f"{own[name]:.2e}"]),
                         _bar(bar, own), "ok" if err <= bar else "FAIL"])
    print(f"{args.model} {args.dtype} batch {args.batch} on {device}: fused model vs the naive "
          f"float64 reference (relative error)" + ("" if own is None else
          f"; bars {LOWP_FACTOR:g}x timm's math's own {args.dtype} error, at least {tol:.0e}"))
    print(_table(["backend", "output", "rel err", *([] if own is None else ["timm's own"]), "bar", ""],
                 rows))
    if not worst[0] <= worst[1]:   # a NaN error fails too
        print(f"FAIL: relative error {worst[0]:.2e} exceeds its bar {_bar(worst[1], own)}")
        return 1
    print(f"ok: worst relative error {worst[0]:.2e} within {_bar(worst[1], own)}")
    return 0


def _model(args):
    """``--model`` with ``--num-classes`` and the weights of ``--checkpoint`` (random without)."""
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    with _num_classes_advice(args):
        return create_model(args.model, checkpoint_path=args.checkpoint, **kwargs)


@contextlib.contextmanager
def _num_classes_advice(args):
    """Where a checkpoint's classifier does not fit the model and ``--num-classes`` was not
    given, a CommandError saying to pass it."""
    try:
        yield
    except CheckpointError as err:
        hint = _num_classes_hint(str(err)) if args.num_classes is None else None
        if hint is None:
            raise
        raise CommandError(f"{_first_line(err)} ({hint})") from err


def _num_classes_hint(message: str) -> Optional[str]:
    """Advice for a checkpoint whose classifier has another number of classes (a fine-tuned
    head), read from the shape mismatch :func:`check_state_dict` names; None otherwise."""
    found = re.search(r"head\.0\.bias \(checkpoint \((\d+),\)", message)
    return f"its head has {found.group(1)} classes: pass --num-classes {found.group(1)}" if found else None


def _bar(bar: float, own) -> str:
    """A bar as the table shows it: one digit where it is the fixed one, two where it follows
    timm's own error."""
    return f"{bar:.0e}" if own is None else f"{bar:.1e}"


def _fused_backend(device: torch.device) -> str:
    """The backend ``CROSSVIT_FAST_BACKEND`` (or ``auto``) picks on ``device``; a CommandError
    naming the variable where it cannot."""
    try:
        return backends.resolve(None, device)
    except ValueError as err:   # an unknown name: the message names the variable
        raise CommandError(str(err)) from err
    except BackendUnavailableError as err:
        raise CommandError(f"{backends.ENV_VAR}={backends.get_backend()}: {err}") from err


def bench(args) -> int:
    from tqdm import tqdm
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    sizes = args.batch_sizes or ([1, 32, 256] if device.type == "cuda" else [1, 4, 16])
    backend = _fused_backend(device)
    json_path = _writable(args.json) if args.json else None
    model = create_model(args.model).to(device, dtype).eval()
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
    if json_path:
        json_path.write_text(json.dumps(dict(environment=env, model=args.model, dtype=args.dtype,
                                             mode="inference", results=results), indent=2))
        print(f"wrote {json_path}")
    return 0


def _writable(path: str) -> Path:
    """``--json PATH`` with its folder made, checked before the benchmark runs rather than after."""
    out = Path(path)
    if out.is_dir():
        raise CommandError(f"--json {path}: is a folder; expected a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def attention(args) -> int:
    try:   # checked first: the picture is drawn last, after the model has run
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as err:
        raise CommandError(f"the attention command needs matplotlib and Pillow ({err.name} is not "
                           f"installed): pip install 'crossvit-fast[viz]'") from err
    from .attention_viz import draw_attention, output_format   # needs matplotlib, only here
    try:   # --out checked before the model runs, as bench's --json
        output_format(args.out)
    except ValueError as err:
        raise CommandError(str(err)) from err
    device = _device(args.device)
    _fused_backend(device)   # a backend the variable asks for that cannot run here: before the model
    with _num_classes_advice(args):
        width, height = draw_attention(args.image, args.model, args.out, checkpoint=args.checkpoint,
                                       num_classes=args.num_classes, heads=args.heads, device=device,
                                       dtype=DTYPES[args.dtype])
    print(f"wrote {args.out} ({width}x{height} pixels)")
    return 0


def build_ext(args) -> int:
    from ._extension import build_extension
    try:
        build_extension(verbose=True)
    except RuntimeError as err:   # no CUDA build of torch, no toolkit or GPU list, a stale lock, or the compiler's output above
        raise CommandError(str(err)) from err
    print("crossvit_fast CUDA extension built")
    return 0
