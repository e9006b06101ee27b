"""``crossvit-fast``: info, check (fused vs naive), bench (images/s), build-ext, attention (maps PNG).

This module parses and checks the arguments; :mod:`.commands` runs them. Nothing here imports
torch before the arguments are parsed, so that ``--help`` and argument errors come back at once
(importing torch takes seconds on a cold start). Argument errors are one line and exit 2.
Failures a user can act on (a backend that cannot run here, a checkpoint that does not fit, out
of memory, a file that cannot be written) are one line and exit 1; ``--debug`` shows their
traceback instead. Anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, List, Optional

DTYPE_NAMES = ("fp32", "bf16", "fp16")   # the keys of crossvit_fast.benchmarking.DTYPES
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


# ---- argument types: each returns the parsed value or raises ArgumentTypeError, which argparse
# ---- prints after the argument's name ("argument --iters: expected ...") and exits with 2.

# The largest size or count torch takes (int64).
_MAX_INT = 2 ** 63 - 1


def positive_int(text: str) -> int:
    """An integer from 1 to 2**63 - 1 (batch sizes, timed runs)."""
    return _int_in(text, 1, _MAX_INT, "a positive integer below 2**63")


def non_negative_int(text: str) -> int:
    """An integer from 0 to 2**63 - 1 (warm-up runs)."""
    return _int_in(text, 0, _MAX_INT, "a non-negative integer below 2**63")


def seed(text: str) -> int:
    """A seed torch accepts: an integer from 0 to 2**63 - 1."""
    return _int_in(text, 0, 2 ** 63 - 1, "an integer seed from 0 to 2**63 - 1")


def _int_in(text: str, minimum: int, maximum: Optional[int], expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (tolerances)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether that device exists is checked when the
    command runs (it needs torch)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def model_name(text: str) -> str:
    """A variant name of ``crossvit_fast.list_models()``.

    The names come from :mod:`.variants`, which imports torch: only once an argument is parsed,
    never for ``--help``."""
    from .variants import list_models
    if text not in list_models():
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; expected one of {', '.join(list_models())}")
    return text


def backend_name(text: str) -> str:
    """A backend name (``auto``, ``triton``, ``cuda``, ``torch``), lower-cased."""
    from .backends import BACKENDS
    if text.lower() not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; expected one of {', '.join(BACKENDS)}")
    return text.lower()


def checkpoint_path(text: str) -> str:
    """A non-empty path (an unset shell variable must not check random weights unnoticed)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected the path of a checkpoint file, got an empty one")
    return text


def comma_list(item: Callable[[str], object]) -> Callable[[str], list]:
    """An argument type for a comma-separated list whose items each parse with ``item``."""
    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
        return [item(s) for s in items]
    return parse


NUM_CLASSES_HELP = "classes of the checkpoint's head (default: the variant's, 1000)"


# ---- the parser ----------------------------------------------------------------------------

class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse's own start with the usage); the
    training example's parser is one too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="crossvit-fast", description="CrossViT with fused kernels: check it "
                                "against the naive model, measure it, inspect the setup.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of a failure instead of one line")

    common = argparse.ArgumentParser(add_help=False, parents=[debug])
    common.add_argument("--model", default="crossvit_tiny_240", type=model_name, metavar="NAME",
                        help="variant name, as in timm (default: crossvit_tiny_240)")
    common.add_argument("--device", default="auto", type=device_name,
                        help="auto (CUDA if present), cpu, cuda or cuda:N (default: auto)")
    common.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES, help="(default: fp32)")

    sub.add_parser("info", parents=[debug], help="versions, device, and which backends are usable (and why not)")

    check = sub.add_parser("check", parents=[common], help="fused model vs the naive float64 reference")
    check.add_argument("--batch", type=positive_int, default=2, help="images per batch (default: 2)")
    check.add_argument("--seed", type=seed, default=0, help="seed of the weights and images (default: 0)")
    check.add_argument("--tol", type=positive_float, default=None,
                       help="bar on every relative error (default: 1e-4 fp32; for 16 bits 4x the "
                            "error of timm's math in that dtype, at least 6e-2 bf16, 1e-2 fp16)")
    check.add_argument("--backends", type=comma_list(backend_name), default=None,
                       help="comma-separated backends (default: every usable one)")
    check.add_argument("--checkpoint", type=checkpoint_path, default=None, metavar="PATH",
                       help="weights to check with (.safetensors or torch.save file; default: random)")
    check.add_argument("--num-classes", type=non_negative_int, default=None, metavar="N",
                       help=NUM_CLASSES_HELP)

    bench = sub.add_parser("bench", parents=[common], help="images/s: fused vs naive model, inference")
    bench.add_argument("--batch-sizes", type=comma_list(positive_int), default=None,
                       help="comma-separated (default: 1,32,256 on CUDA, 1,4,16 on CPU)")
    bench.add_argument("--warmup", type=non_negative_int, default=2, help="untimed runs first (default: 2)")
    bench.add_argument("--iters", type=positive_int, default=5, help="timed runs (default: 5)")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")

    sub.add_parser("build-ext", parents=[debug], help="build the CUDA C++ extension now instead of on first use")

    attention = sub.add_parser("attention", parents=[common],
                               help="draw each branch's CLS cross-attention over an image (PNG)")
    attention.add_argument("image", help="an image file (any format Pillow reads)")
    attention.add_argument("--checkpoint", type=checkpoint_path, default=None, metavar="PATH",
                           help="weights to load (default: random weights, labelled so)")
    attention.add_argument("--num-classes", type=non_negative_int, default=None, metavar="N",
                           help=NUM_CLASSES_HELP)
    attention.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    attention.add_argument("--heads", action="store_true", help="one heat map per head, not the mean")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands   # imports torch: only now, after the arguments are parsed
    try:
        return commands.run(args)
    except Exception as err:  # noqa: BLE001 - sorted into failures the user can act on and bugs
        message = None if args.debug else commands.expected_failure(err)
        if message is None:
            raise
        print(f"crossvit-fast {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
