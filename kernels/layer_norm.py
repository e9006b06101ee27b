"""LayerNorm with an optional residual add folded in, forward and backward.

Each program handles ``ROWS`` rows of width ``C`` whole in registers (``BLOCK_C =
next_power_of_2(C)``). Forward: ``h = x + residual`` rounded to the promoted dtype of the two
(stored, and the statistics are taken on that rounded ``h``), ``y`` written in that dtype or in
``out_dtype``, fp32 ``mean``/``rstd`` saved. Backward: a bounded
number of programs each loop over row blocks, write ``dx (+ dh)`` and one row of partial
``dweight``/``dbias`` each, summed by the caller. Each backward program keeps its partials as a
whole ``[ROWS, BLOCK_C]`` block in registers and sums its rows once at the end, not in every
iteration (a column sum crosses warps: shared memory and a barrier), and takes half the forward's
elements per iteration, so that three programs fit on each SM at once (:func:`_bwd_blocks`).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import acc_dtype, cdiv, contiguous_as, direct, next_power_of_2, num_sms, unit_last_stride


# The backward's row blocks: 16 elements of each tensor per thread, which with the partial sums
# kept in registers compiles to 112 to 148 registers at the CrossViT widths (Triton 3.6 and 3.9),
# so that three programs of 4 warps (12 warps) are resident on an SM at once (it was 2 programs of
# ~170 registers, and the H100 measured that backward at 35–46% of copy bandwidth). No register
# cap: inductor drops a user kernel's maxnreg, and a compiled launch would differ from an eager.
BWD_ELEMENTS_PER_THREAD = 16
BWD_WARPS_PER_SM = 12


@functools.lru_cache(maxsize=None)   # called on every launch: cached per width
def _blocks(C: int) -> Tuple[int, int, int]:
    """``(BLOCK_C, ROWS, num_warps)`` of the forward: about 4K elements per program. ``C`` a
    plain int: a symbolic width (the compiler, dynamic shapes) does not hash; ``int()``
    specializes it."""
    block_c = next_power_of_2(C)
    return block_c, max(1, min(16, 4096 // block_c)), (4 if block_c <= 1024 else 8)


@functools.lru_cache(maxsize=None)
def _bwd_blocks(C: int) -> Tuple[int, int, int, int]:
    """``(BLOCK_C, ROWS, num_warps, programs_per_sm)`` of the backward: row blocks of about 2K
    elements (one row where it is wider), 4 to 16 warps of :data:`BWD_ELEMENTS_PER_THREAD` each
    (past a width of 8K, more elements per thread), :data:`BWD_WARPS_PER_SM` warps per SM."""
    block_c = next_power_of_2(C)
    rows = max(1, min(16, 2048 // block_c))
    num_warps = min(16, max(4, rows * block_c // (32 * BWD_ELEMENTS_PER_THREAD)))
    return block_c, rows, num_warps, max(1, BWD_WARPS_PER_SM // num_warps)


def _rows(t: Tensor, C: int) -> Tensor:
    """``t`` as ``[M, C]`` rows with unit column stride (a copy only when it has none)."""
    return unit_last_stride(t.reshape(-1, C))


@triton.jit(do_not_specialize=["M"])
def _layer_norm_fwd_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,
                           M, C, s_x, s_r, eps: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RES: tl.constexpr,
                           ACC: tl.constexpr):
    """Grid ``cdiv(M, ROWS)``. ``y`` and ``h`` are contiguous ``[M, C]``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    out_offs = rows[:, None] * C + cols[None, :]
    h = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        # Add in ACC, round once to the activation dtype; the statistics see the rounded h.
        r = tl.load(r_ptr + rows[:, None] * s_r + cols[None, :], mask=mask, other=0.0)
        h = (h + r.to(ACC)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + out_offs, h, mask=mask)
        h = h.to(ACC)
    mean = tl.sum(h, 1) / C
    hc = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, 1) / C + eps)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0)
    b = tl.load(b_ptr + cols, mask=cols < C, other=0.0)
    y = hc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit(do_not_specialize=["M"])
def _layer_norm_bwd_kernel(dy_ptr, dh_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr,
                           dw_ptr, db_ptr, M, C, s_dy, s_dh, s_h,
                           ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DH: tl.constexpr,
                           ACC: tl.constexpr):
    """Grid ``P``; program ``p`` takes row blocks ``p, p + P, …`` and writes row ``p`` of the
    ``[P, C]`` partials. ``dx = rstd (dn − mean(dn) − n mean(dn n)) + dh`` with ``dn = dy ⊙ w``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0)
    dw = tl.zeros([ROWS, BLOCK_C], ACC)   # summed over rows after the loop
    db = tl.zeros([ROWS, BLOCK_C], ACC)
    for r0 in range(pid * ROWS, M, tl.num_programs(0) * ROWS):
        rows = r0 + tl.arange(0, ROWS).to(tl.int64)
        mask = (rows < M)[:, None] & (cols < C)[None, :]
        h = tl.load(h_ptr + rows[:, None] * s_h + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + rows, mask=rows < M, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        n = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + rows[:, None] * s_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        dn = dy * w[None, :]
        dx = (dn - (tl.sum(dn, 1) / C)[:, None] - n * (tl.sum(dn * n, 1) / C)[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(dh_ptr + rows[:, None] * s_dh + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + rows[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * n
        db += dy
    tl.store(dw_ptr + pid * C + cols, tl.sum(dw, 0), mask=cols < C)
    tl.store(db_ptr + pid * C + cols, tl.sum(db, 0), mask=cols < C)


def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                   eps: float, out_dtype: Optional[torch.dtype] = None, launch=direct
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, h, mean, rstd)`` for ``[M, C]`` rows; see ``torch_backend.layer_norm_fwd``.
    Without a residual, ``h`` is ``x`` itself; ``x`` and ``residual`` are each read in their own
    dtype, ``y`` and ``h`` written in the promoted one (``y`` in ``out_dtype`` where given)."""
    M, C = x.shape
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    acc = acc_dtype(dtype)
    xr = _rows(x, C)
    res = None if residual is None else _rows(residual, C)
    weight, bias = contiguous_as(weight, acc), contiguous_as(bias, acc)
    block_c, rows, num_warps = _blocks(int(C))
    y = x.new_empty((M, C), dtype=out_dtype or dtype)
    h = x if res is None else x.new_empty((M, C), dtype=dtype)
    mean, rstd = x.new_empty(M, dtype=acc), x.new_empty(M, dtype=acc)
    launch(_layer_norm_fwd_kernel)[(cdiv(M, rows),)](
        xr, xr if res is None else res, weight, bias, y, h, mean, rstd, M, C,
        xr.stride(0), (xr if res is None else res).stride(0), eps,
        ROWS=rows, BLOCK_C=block_c, HAS_RES=res is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=num_warps)
    return y, h, mean, rstd


def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor, launch=direct) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; see ``torch_backend.layer_norm_bwd``."""
    M, C = h.shape
    acc = acc_dtype(h.dtype)
    dy, hr = _rows(dy, C), _rows(h, C)
    dh = None if dh is None else _rows(dh, C)
    weight, mean, rstd = (contiguous_as(t, acc) for t in (weight, mean, rstd))
    block_c, rows, num_warps, programs_per_sm = _bwd_blocks(int(C))
    programs = max(1, min(cdiv(M, rows), programs_per_sm * num_sms(h.device)))
    dx = h.new_empty((M, C))
    dw, db = h.new_empty((programs, C), dtype=acc), h.new_empty((programs, C), dtype=acc)
    launch(_layer_norm_bwd_kernel)[(programs,)](
        dy, dy if dh is None else dh, hr, weight, mean, rstd, dx, dw, db, M, C,
        dy.stride(0), (dy if dh is None else dh).stride(0), hr.stride(0),
        ROWS=rows, BLOCK_C=block_c, HAS_DH=dh is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=num_warps)
    return dx, dw.sum(dim=0), db.sum(dim=0)
