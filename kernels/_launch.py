"""Host-side helpers shared by the kernels' launch wrappers.

Plain Python on purpose: every fused op pays these on each call, and ``triton.cdiv`` /
``triton.next_power_of_2`` cost microseconds each through Triton's function wrapper (measured
on the CPU machine: about 5 µs per call of a block-size helper built on them).

Every kernel takes the LayerNorm ``eps`` as a ``tl.constexpr``: inductor types the Python floats
it passes to user-defined kernels as fp64 (``_use_fp64_for_unbacked_floats``), which turned the
statistics, and through them the softmax state, fp64 under ``torch.compile`` and failed the token
pass's compilation on a GPU (torch 2.11, Triton 3.6: mixed fp32/fp64 types). A constexpr is folded
in at fp32.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton.language as tl
from torch import Tensor
from triton import knobs
from triton.runtime.jit import JITFunction

# Read once, as triton.jit does when it decorates the kernels (TRITON_INTERPRET=1, true, on or yes).
INTERPRET = bool(knobs.runtime.interpret)
# SM count assumed where there is no CUDA device (an H100), so grid heuristics still apply.
DEFAULT_NUM_SMS = 132


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 accumulates in float64 (the tests' reference precision), everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtypes(dtype: torch.dtype):
    """``(ACC, DOT)``: the accumulation dtype and the ``tl.dot`` operand dtype for activations of
    ``dtype`` (their own, for the tensor cores; bf16 goes up to fp32 under the interpreter, whose
    bf16 ``tl.dot`` is broken: design.md §4)."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return acc, LOW_PRECISION_DOT.get(dtype, acc)


# tl.dot operand dtype for fp16/bf16 products.
LOW_PRECISION_DOT = {torch.float16: tl.float16,
                     torch.bfloat16: tl.float32 if INTERPRET else tl.bfloat16}


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def contiguous_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` contiguous in ``dtype``, checked first (``.to``/``.contiguous`` cost host time even
    as no-ops)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dim is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def token_rows(t: Tensor) -> Tensor:
    """``t`` (``[.., N, C]`` tokens) as the token kernels read it: unit last stride, and its
    tokens within 2**31 elements of its first (the kernels index a sample's tokens in 32 bits,
    its samples in 64): a sequence-first view of a huge batch, say, is copied."""
    t = unit_last_stride(t)
    if t.dim() >= 2 and t.shape[-2] * abs(t.stride(-2)) >= 2 ** 31:
        t = t.contiguous()
    return t


def on_device_of(t: Tensor):
    """A context in which an eager launch runs on ``t``'s GPU: Triton launches on the current
    CUDA device, which may be another one (a model on cuda:1 while cuda:0 is current); nothing to
    do where it is ``t``'s already (the usual case) or ``t`` is not on a GPU."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def direct(kernel):
    """The kernel as it is: launched at once (every eager call)."""
    return kernel


def traced(kernel):
    """The kernel as ``torch.compile`` records it inside a ``torch.library.triton_op`` body:
    ``wrap_triton(kernel)``, so that the compiled graph holds the launch and inductor makes it
    from its own generated code (no Python op call, CUDA-graph trees capture it). Outside a
    trace ``wrap_triton`` hands back the kernel itself. A kernel that Triton's CPU interpreter
    runs cannot be recorded (torch 2.11's ``wrap_triton`` refuses it): it is returned as it is,
    for the eager calls of the op that the tests make."""
    from torch.library import wrap_triton
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel
