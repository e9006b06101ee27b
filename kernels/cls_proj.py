"""CLS projection ``y = GELU(LN(x)) @ W.T + b`` (GELU exact, erf), forward and backward.

The rows are few (one CLS token per sample), so the forward tiles the output columns: a program
takes ``BLOCK_M`` rows and ``BLOCK_O`` outputs, computes the rows' LayerNorm statistics over the
whole width, then walks the input width in ``BLOCK_K`` chunks, recomputing LN → GELU on each chunk
in registers and feeding it to ``tl.dot`` with the weight tile. The backward kernel recomputes
LN → GELU per row block, accumulates ``dy @ W`` over output chunks with ``tl.dot``, and writes
``dx`` (LayerNorm backward through GELU'), the activation (for ``dW = dyᵀ act``, a cuBLAS
matmul) and per-program partial ``dln_weight``/``dln_bias``.
"""
from __future__ import annotations

from typing import Tuple

import triton
import triton.language as tl
from torch import Tensor

from ._launch import (acc_dtype, cdiv, contiguous_as, direct, next_power_of_2, tl_dtypes,
                      unit_last_stride)

BLOCK_M = 16      # rows per program: the smallest tl.dot
BLOCK_O = 32      # forward: output columns per program
BLOCK_K = 64      # forward: input columns per dot step


@triton.jit
def _row_stats(x_ptr, rows, M, Cin, s_x, eps, BLOCK_CIN: tl.constexpr, ACC: tl.constexpr):
    """``(mean, rstd)`` of rows ``rows`` (whole width in registers, two-pass variance)."""
    cols = tl.arange(0, BLOCK_CIN)
    mask = (rows < M)[:, None] & (cols < Cin)[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, 1) / Cin
    xc = tl.where(mask, x - mean[:, None], 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / Cin + eps)


@triton.jit
def _gelu(u):
    """``(GELU(u), GELU'(u))`` with the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
    pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
    return u * cdf, cdf + u * pdf


@triton.jit(do_not_specialize=["M"])
def _cls_proj_fwd_kernel(x_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                         M, Cin, Cout, s_x, eps: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_CIN: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    """Grid ``(cdiv(Cout, BLOCK_O), cdiv(M, BLOCK_M))``; ``W`` is ``[Cout, Cin]`` contiguous."""
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    mean, rstd = _row_stats(x_ptr, rows, M, Cin, s_x, eps, BLOCK_CIN, ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_O], ACC)
    for k0 in range(0, Cin, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xmask = (rows < M)[:, None] & (k < Cin)[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_x + k[None, :], mask=xmask, other=0.0).to(ACC)
        lnw = tl.load(lnw_ptr + k, mask=k < Cin, other=0.0)
        lnb = tl.load(lnb_ptr + k, mask=k < Cin, other=0.0)
        act, _ = _gelu((x - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :])
        w = tl.load(w_ptr + outs[:, None] * Cin + k[None, :],
                    mask=(outs < Cout)[:, None] & (k < Cin)[None, :], other=0.0)
        acc += tl.dot(act.to(DOT), tl.trans(w.to(DOT)), input_precision="ieee")
    y = acc + tl.load(b_ptr + outs, mask=outs < Cout, other=0.0)[None, :]
    tl.store(y_ptr + rows[:, None] * Cout + outs[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (outs < Cout)[None, :])
    if tl.program_id(0) == 0:
        tl.store(mean_ptr + rows, mean, mask=rows < M)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit(do_not_specialize=["M"])
def _cls_proj_bwd_kernel(dy_ptr, x_ptr, lnw_ptr, lnb_ptr, w_ptr, mean_ptr, rstd_ptr,
                         dx_ptr, act_ptr, dlnw_ptr, dlnb_ptr, M, Cin, Cout, s_dy, s_x,
                         BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
                         BLOCK_CIN: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    """Grid ``cdiv(M, BLOCK_M)``. ``du = (dy @ W) ⊙ GELU'(u)``, ``dx`` = LayerNorm backward of
    ``du ⊙ ln_weight``; writes ``act`` ``[M, Cin]`` and row ``pid`` of the partial
    ``dln_weight = Σ du n`` and ``dln_bias = Σ du``."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_CIN)
    mask = (rows < M)[:, None] & (cols < Cin)[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + rows, mask=rows < M, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
    n = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    lnw = tl.load(lnw_ptr + cols, mask=cols < Cin, other=0.0)
    lnb = tl.load(lnb_ptr + cols, mask=cols < Cin, other=0.0)
    act, dact = _gelu(n * lnw[None, :] + lnb[None, :])
    tl.store(act_ptr + rows[:, None] * Cin + cols[None, :], act, mask=mask)
    dact_in = tl.zeros([BLOCK_M, BLOCK_CIN], ACC)          # dy @ W
    for o0 in range(0, Cout, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        dy = tl.load(dy_ptr + rows[:, None] * s_dy + o[None, :],
                     mask=(rows < M)[:, None] & (o < Cout)[None, :], other=0.0)
        w = tl.load(w_ptr + o[:, None] * Cin + cols[None, :],
                    mask=(o < Cout)[:, None] & (cols < Cin)[None, :], other=0.0)
        dact_in += tl.dot(dy.to(DOT), w.to(DOT), input_precision="ieee")
    du = tl.where(mask, dact_in * dact, 0.0)
    dn = du * lnw[None, :]
    dx = (dn - (tl.sum(dn, 1) / Cin)[:, None] - n * (tl.sum(dn * n, 1) / Cin)[:, None]) * rstd[:, None]
    tl.store(dx_ptr + rows[:, None] * Cin + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dlnw_ptr + pid * Cin + cols, tl.sum(du * n, 0), mask=cols < Cin)
    tl.store(dlnb_ptr + pid * Cin + cols, tl.sum(du, 0), mask=cols < Cin)


def _prepare(x: Tensor, *params: Tensor):
    acc = acc_dtype(x.dtype)
    return (acc, *tl_dtypes(x.dtype), unit_last_stride(x),
            *(contiguous_as(p, acc) for p in params))


def cls_proj_fwd(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                 eps: float, launch=direct) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y [M, Cout], mean [M], rstd [M])``; see ``torch_backend.cls_proj_fwd``."""
    M, Cin = x.shape
    Cout = weight.shape[0]
    acc, ACC, DOT, x, ln_weight, ln_bias, weight, bias = _prepare(x, ln_weight, ln_bias, weight, bias)
    y = x.new_empty((M, Cout))
    mean, rstd = x.new_empty(M, dtype=acc), x.new_empty(M, dtype=acc)
    block_cin = max(16, next_power_of_2(Cin))
    launch(_cls_proj_fwd_kernel)[(cdiv(Cout, BLOCK_O), cdiv(M, BLOCK_M))](
        x, ln_weight, ln_bias, weight, bias, y, mean, rstd, M, Cin, Cout, x.stride(0), eps,
        BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, BLOCK_K=min(BLOCK_K, block_cin), BLOCK_CIN=block_cin,
        ACC=ACC, DOT=DOT, num_warps=4)
    return y, mean, rstd


def cls_proj_bwd(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor,
                 mean: Tensor, rstd: Tensor, launch=direct
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dln_weight, dln_bias, dweight, dbias)``; see ``torch_backend.cls_proj_bwd``."""
    M, Cin = x.shape
    Cout = weight.shape[0]
    acc, ACC, DOT, x, ln_weight, ln_bias, weight, mean, rstd = _prepare(
        x, ln_weight, ln_bias, weight, mean, rstd)
    dy = unit_last_stride(dy)
    block_cin = max(16, next_power_of_2(Cin))
    programs = cdiv(M, BLOCK_M)
    dx = x.new_empty((M, Cin))
    act = x.new_empty((M, Cin), dtype=acc)
    dlnw, dlnb = x.new_empty((programs, Cin), dtype=acc), x.new_empty((programs, Cin), dtype=acc)
    launch(_cls_proj_bwd_kernel)[(programs,)](
        dy, x, ln_weight, ln_bias, weight, mean, rstd, dx, act, dlnw, dlnb, M, Cin, Cout,
        dy.stride(0), x.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_O=max(16, min(64, 8192 // block_cin)), BLOCK_CIN=block_cin,
        ACC=ACC, DOT=DOT, num_warps=4 if block_cin <= 256 else 8)
    dy = dy.to(acc)
    return dx, dlnw.sum(dim=0), dlnb.sum(dim=0), dy.t() @ act, dy.sum(dim=0)
