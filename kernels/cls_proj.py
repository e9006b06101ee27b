"""CLS projection ``y = GELU(LN(x)) @ W.T + b`` (GELU exact, erf), forward and backward.

No program holds a whole row: every block is ``BLOCK_M`` rows by a fixed channel tile, so shared
memory and registers do not grow with ``Cin`` or ``Cout`` (the whole-row design needed 130 KB of
shared memory and spilled at ``Cin = 768``: more than an RTX 30xx/40xx grants a block).

The rows are few (one CLS token per sample), so the forward tiles the output columns: a program
takes ``BLOCK_M`` rows and ``BLOCK_O`` outputs, sweeps the input width in ``BLOCK_K`` tiles once
for the rows' LayerNorm statistics (per-tile mean and M2 merged with Chan's update,
``_stats.merge_tile_stats``: stable when a row's mean is large against its spread), then again
recomputing LN → GELU on each tile in registers and feeding it to ``tl.dot`` with the weight tile.

The backward takes the forward's ``mean``/``rstd``; one program per ``BLOCK_M`` rows sweeps the
input width twice. LayerNorm's backward needs two sums over the whole row (``Σ dn`` and
``Σ dn·n``, ``dn = du ⊙ ln_weight``, ``du = (dy @ W) ⊙ GELU'(u)``) before any ``dx`` is known,
so sweep 1 computes each tile's ``du`` (``dy @ W[:, tile]`` accumulated over ``BLOCK_O`` output
chunks with ``tl.dot``), accumulates the sums, and writes the tile's activation (for
``dW = dyᵀ act``, a cuBLAS matmul) and per-program partial ``dln_weight``/``dln_bias``; sweep 2
recomputes ``du`` by the same code (so the same values) and writes ``dx``.
"""
from __future__ import annotations

from typing import Tuple

import triton
import triton.language as tl
from torch import Tensor

from ._launch import (acc_dtype, cdiv, contiguous_as, direct, next_power_of_2, tl_dtypes,
                      unit_last_stride)
from ._stats import merge_tile_stats, rstd_of

BLOCK_M = 16      # rows per program: the smallest tl.dot
BLOCK_O = 32      # forward: output columns per program
BLOCK_K = 64      # input columns per tile (forward and backward)
BLOCK_O_BWD = 32  # backward: output columns per dot step of dy @ W


def _tile(width: int, block: int) -> int:
    """``block``, or less for a narrower ``width`` (no wasted lanes; ``tl.dot`` needs ≥ 16)."""
    return min(block, max(16, next_power_of_2(width)))


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
                         ACC: tl.constexpr, DOT: tl.constexpr):
    """Grid ``(cdiv(M, BLOCK_M), cdiv(Cout, BLOCK_O))``: rows on the first axis, which has no
    65535 limit (any ``[..., Cin]`` input may be flattened here); ``W`` is ``[Cout, Cin]``
    contiguous."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mean = tl.zeros([BLOCK_M], ACC)
    m2 = tl.zeros([BLOCK_M], ACC)
    for c0 in range(0, Cin, BLOCK_K):
        k = c0 + tl.arange(0, BLOCK_K)
        xmask = (rows < M)[:, None] & (k < Cin)[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_x + k[None, :], mask=xmask, other=0.0).to(ACC)
        mean, m2 = merge_tile_stats(mean, m2, c0, x, xmask, tl.minimum(BLOCK_K, Cin - c0))
    rstd = rstd_of(m2, Cin, eps)
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
    if tl.program_id(1) == 0:
        tl.store(mean_ptr + rows, mean, mask=rows < M)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _du_tile(dy_ptr, x_ptr, lnw_ptr, lnb_ptr, w_ptr, rows, k, mean, rstd, M, Cin, Cout, s_dy, s_x,
             BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    """For rows ``rows`` and input columns ``k``: ``(mask, n, lnw, act, du)``, ``n`` the
    normalized input, ``act = GELU(n ⊙ lnw + lnb)``, ``du = (dy @ W[:, k]) ⊙ GELU'`` (zero
    outside ``mask``)."""
    mask = (rows < M)[:, None] & (k < Cin)[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_x + k[None, :], mask=mask, other=0.0).to(ACC)
    n = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    lnw = tl.load(lnw_ptr + k, mask=k < Cin, other=0.0)
    lnb = tl.load(lnb_ptr + k, mask=k < Cin, other=0.0)
    act, dact = _gelu(n * lnw[None, :] + lnb[None, :])
    g = tl.zeros([BLOCK_M, k.shape[0]], ACC)                 # dy @ W[:, k]
    for o0 in range(0, Cout, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        dy = tl.load(dy_ptr + rows[:, None] * s_dy + o[None, :],
                     mask=(rows < M)[:, None] & (o < Cout)[None, :], other=0.0)
        w = tl.load(w_ptr + o[:, None] * Cin + k[None, :],
                    mask=(o < Cout)[:, None] & (k < Cin)[None, :], other=0.0)
        g += tl.dot(dy.to(DOT), w.to(DOT), input_precision="ieee")
    return mask, n, lnw, act, tl.where(mask, g * dact, 0.0)


@triton.jit(do_not_specialize=["M"])
def _cls_proj_bwd_kernel(dy_ptr, x_ptr, lnw_ptr, lnb_ptr, w_ptr, mean_ptr, rstd_ptr,
                         dx_ptr, act_ptr, dlnw_ptr, dlnb_ptr, M, Cin, Cout, s_dy, s_x,
                         BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                         ACC: tl.constexpr, DOT: tl.constexpr):
    """Grid ``cdiv(M, BLOCK_M)``. ``dx`` = LayerNorm backward of ``du ⊙ ln_weight``; writes
    ``act`` ``[M, Cin]`` and row ``pid`` of the partial ``dln_weight = Σ du n`` and
    ``dln_bias = Σ du``."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mean = tl.load(mean_ptr + rows, mask=rows < M, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
    sum_dn = tl.zeros([BLOCK_M], ACC)
    sum_dn_n = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, Cin, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask, n, lnw, act, du = _du_tile(dy_ptr, x_ptr, lnw_ptr, lnb_ptr, w_ptr, rows, k, mean,
                                         rstd, M, Cin, Cout, s_dy, s_x, BLOCK_M, BLOCK_O, ACC, DOT)
        dn = du * lnw[None, :]
        sum_dn += tl.sum(dn, 1)
        sum_dn_n += tl.sum(dn * n, 1)
        tl.store(act_ptr + rows[:, None] * Cin + k[None, :], act, mask=mask)
        tl.store(dlnw_ptr + pid * Cin + k, tl.sum(du * n, 0), mask=k < Cin)
        tl.store(dlnb_ptr + pid * Cin + k, tl.sum(du, 0), mask=k < Cin)
    mean_dn = sum_dn / Cin
    mean_dn_n = sum_dn_n / Cin
    for k0 in range(0, Cin, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask, n, lnw, _, du = _du_tile(dy_ptr, x_ptr, lnw_ptr, lnb_ptr, w_ptr, rows, k, mean,
                                       rstd, M, Cin, Cout, s_dy, s_x, BLOCK_M, BLOCK_O, ACC, DOT)
        dx = (du * lnw[None, :] - mean_dn[:, None] - n * mean_dn_n[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * Cin + k[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)


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
    launch(_cls_proj_fwd_kernel)[(cdiv(M, BLOCK_M), cdiv(Cout, BLOCK_O))](
        x, ln_weight, ln_bias, weight, bias, y, mean, rstd, M, Cin, Cout, x.stride(0), eps,
        BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, BLOCK_K=_tile(Cin, BLOCK_K),
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
    programs = cdiv(M, BLOCK_M)
    dx = x.new_empty((M, Cin))
    act = x.new_empty((M, Cin), dtype=acc)
    dlnw, dlnb = x.new_empty((programs, Cin), dtype=acc), x.new_empty((programs, Cin), dtype=acc)
    launch(_cls_proj_bwd_kernel)[(programs,)](
        dy, x, ln_weight, ln_bias, weight, mean, rstd, dx, act, dlnw, dlnb, M, Cin, Cout,
        dy.stride(0), x.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_O=_tile(Cout, BLOCK_O_BWD), BLOCK_K=_tile(Cin, BLOCK_K),
        # 32 output columns a step, 8 warps, one stage: spill-free in Triton 3.6's and 3.9's
        # binaries (bench.kernel_resources); with 4 warps Triton 3.9's spilled 16 B in fp32 and
        # under autocast on sm_90, and 64 columns a step spilled on both.
        ACC=ACC, DOT=DOT, num_warps=8, num_stages=1)
    dy = dy.to(acc)
    return dx, dlnw.sum(dim=0), dlnb.sum(dim=0), dy.t() @ act, dy.sum(dim=0)
