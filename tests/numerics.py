"""Error measures and tolerance bars shared by the correctness tests (design.md §4)."""
from typing import Callable, Sequence

import torch

# fp32 promise: relative error against the float64 reference.
FP32_REL_TOL = 1e-5
# Two fp32 computations of one function that may sum in other orders (another kernel, a traced,
# exported or compiled graph, a fused op, another CPU's vector width): each is within
# FP32_REL_TOL of float64, so within twice that of each other. (A bar of 1e-6 between two fp32
# paths failed on one CI machine at 1.45e-6: below what fp32 promises, so no defect.)
FP32_PAIR_TOL = 2 * FP32_REL_TOL
# Floors for low precision, applied when PyTorch's own error happens to be tiny on a case.
LOWP_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# How much worse than PyTorch's own low-precision error a kernel may be.
LOWP_FACTOR = 4.0


# Scale floor: a reference that is (mathematically) zero, e.g. dkt with no patch tokens, is
# compared absolutely at this scale instead of dividing by rounding noise.
SCALE_FLOOR = 1e-3


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, SCALE_FLOOR), computed in float64."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(scale, SCALE_FLOOR)


def assert_rel_close(actual, expected, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def tolerance(dtype: torch.dtype, torch_lowp_errors: Sequence[float] = ()) -> float:
    """The bar for ``dtype``: 1e-5 for fp32; for fp16/bf16, LOWP_FACTOR × PyTorch's own error."""
    if dtype in (torch.float32, torch.float64):
        return FP32_REL_TOL
    own = max(torch_lowp_errors, default=0.0)
    return max(LOWP_FACTOR * own, LOWP_FLOOR[dtype])


def torch_lowp_error(naive: Callable, inputs_f64: Sequence, dtype: torch.dtype) -> float:
    """Worst relative error of ``naive`` run by PyTorch in ``dtype`` against itself in float64."""
    ref = naive(*inputs_f64)
    low = naive(*[t.to(dtype) if isinstance(t, torch.Tensor) else t for t in inputs_f64])
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    lows = low if isinstance(low, (tuple, list)) else (low,)
    return max(rel_err(lo, r) for lo, r in zip(lows, refs))
