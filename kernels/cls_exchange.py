"""One branch's whole CLS exchange in one kernel, for inference at small batch (design.md §2):

    x0  = Linear_p(GELU(LN_p(cls)))                                the projection to the other width
    y   = x0 + proj(attention of LN(x0) over LN([x0 ‖ patches]))   the cross-attention (K, V absorbed)
    out = Linear_r(GELU(LN_r(y)))                                  the projection back

At batch 1 the unfused exchange is about 16 kernels per direction (three for each projection, the
cross-attention's LayerNorm, q, kt, token pass, values, out-projection and residual), each too
small to fill more than a sliver of the GPU: their launch latencies, not their work, set the time
(about 40% of crossvit_tiny_240's kernels at batch 1). Here one program per sample runs the chain
from end to end: the matrix-vector products stream each weight once (from L2 after the first
call), the token pass walks the other branch's tokens once with an online softmax, head by head
on each token tile, and the small vectors between the steps go through a per-sample scratch row
(``tl.debug_barrier`` between a step's stores and the next step's loads, which read at L2, where
the other threads' stores are).

Every product and statistic is fp32 (fp64 for fp64 tokens), without ``tl.dot``: an fp32 dot's
operands held whole rows in registers and spilled. Like timm's modules, the outputs of the
Linears (the projection's ``x0``, the out-projection's and the projection back's) are rounded to
the dtype timm's Linears write, the tokens' own or, under autocast, autocast's, and the block's
residual sum ``y`` to the tokens' dtype. Under autocast timm also rounds the Linears' inputs and
weights and its attention's products to autocast's dtype; this kernel keeps them fp32, as the
unfused cross-attention keeps its small products (its token pass takes autocast's dtype). No
gradient: the model calls it only without autograd. A program holds whole rows (padded to a power
of two), so the widths are bounded (:data:`MAX_WIDTH`) where the channel-tiled kernels' are not.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import acc_dtype, next_power_of_2
from .cls_proj import _gelu

# The widest branch the kernel takes (crossvit_18's 448 and narrower; crossvit_base's 768 is not).
MAX_WIDTH = 512
MAX_HEADS = 16
# Register tiles (a weight tile, a token tile) hold this many fp32 elements a thread.
ELEMENTS_PER_THREAD = 16
BLOCK_C = 64      # channels per step of the per-head products
NUM_WARPS = 8     # with 16 (128 registers a thread) tiles spilled (bench.kernel_resources)
# Registers a thread may take: left to itself, ptxas capped some configurations at 128 and spilled.
MAX_REGISTERS = 255
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def _rows_per_tile(width: int) -> int:
    """Rows of a register tile of rows ``width`` wide (padded to a power of two)."""
    return max(1, min(64, ELEMENTS_PER_THREAD * 32 * NUM_WARPS // next_power_of_2(width)))


class Projection(NamedTuple):
    """``Linear(GELU(LN(x)))``: LayerNorm ``ln_weight``/``ln_bias``/``eps``, Linear ``weight``
    ``[Cout, Cin]`` and ``bias``."""
    ln_weight: Tensor
    ln_bias: Tensor
    eps: float
    weight: Tensor
    bias: Tensor


class CrossAttention(NamedTuple):
    """timm's ``CrossAttentionBlock`` parameters: ``norm1`` and the four ``[C, C]`` Linears
    (``wk``'s bias cancels in the softmax and is not read)."""
    ln_weight: Tensor
    ln_bias: Tensor
    eps: float
    wq_weight: Tensor
    wq_bias: Optional[Tensor]
    wk_weight: Tensor
    wv_weight: Tensor
    wv_bias: Optional[Tensor]
    proj_weight: Tensor
    proj_bias: Optional[Tensor]
    num_heads: int
    scale: float


def fits(width_in: int, width_out: int, num_heads: int) -> bool:
    """Whether the kernel takes an exchange between branches of these widths and heads."""
    return max(width_in, width_out) <= MAX_WIDTH and 1 <= num_heads <= MAX_HEADS


# ---- device helpers -----------------------------------------------------------------------------

@triton.jit
def _layer_norm_row(x, mask, C, eps: tl.constexpr):
    """``(x - mean) / sqrt(var + eps)`` of a whole row ``x`` (zero outside ``mask``), two-pass."""
    mean = tl.sum(x, 0) / C
    d = tl.where(mask, x - mean, 0.0)
    return d / tl.sqrt(tl.sum(d * d, 0) / C + eps)


@triton.jit
def _ln_gelu(x, mask, C, lnw_ptr, lnb_ptr, cols, eps: tl.constexpr):
    """``GELU(LN(x))`` (exact, erf) of a whole row, zero outside ``mask``."""
    lnw = tl.load(lnw_ptr + cols, mask=mask, other=0.0).to(x.dtype)
    lnb = tl.load(lnb_ptr + cols, mask=mask, other=0.0).to(x.dtype)
    act, _ = _gelu(_layer_norm_row(x, mask, C, eps) * lnw + lnb)
    return tl.where(mask, act, 0.0)


@triton.jit
def _matvec(w_ptr, b_ptr, v, cols, Cin, out_ptr, Cout, res_ptr,
            HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND: tl.constexpr,
            SUM_ROUND: tl.constexpr, BLOCK_O: tl.constexpr):
    """``out = W v (+ b) (+ res)`` for a whole input row ``v`` (``W``: ``[Cout, Cin]``
    contiguous), ``BLOCK_O`` outputs at a time. ``W v + b`` is rounded to ``ROUND`` (a Linear's
    output dtype), the sum with the residual to ``SUM_ROUND``."""
    for o0 in range(0, Cout, BLOCK_O):
        rows = o0 + tl.arange(0, BLOCK_O)
        rmask = rows < Cout
        w = tl.load(w_ptr + rows[:, None] * Cin + cols[None, :],
                    mask=rmask[:, None] & (cols < Cin)[None, :], other=0.0)
        y = tl.sum(w.to(v.dtype) * v[None, :], 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(v.dtype)
        y = y.to(ROUND).to(v.dtype)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + rows, mask=rmask, other=0.0, cache_modifier=".cg")
            y = (y + res).to(SUM_ROUND)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


# ---- the kernel ---------------------------------------------------------------------------------

@triton.jit
def _cls_exchange_kernel(
        src_ptr, s_src, other_ptr, s_ob, s_on, out_ptr, s_out, scratch_ptr, s_scratch,
        plnw_ptr, plnb_ptr, pw_ptr, pb_ptr,
        alnw_ptr, alnb_ptr, wq_ptr, bq_ptr, wk_ptr, wv_ptr, bv_ptr, wo_ptr, bo_ptr,
        rlnw_ptr, rlnb_ptr, rw_ptr, rb_ptr,
        Ci, Cj, N, H: tl.constexpr, D, scale: tl.constexpr,
        p_eps: tl.constexpr, a_eps: tl.constexpr, r_eps: tl.constexpr,
        HAS_BQ: tl.constexpr, HAS_BV: tl.constexpr, HAS_BO: tl.constexpr,
        CI_PAD: tl.constexpr, CJ_PAD: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_OI: tl.constexpr, BLOCK_OJ: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ACC: tl.constexpr, ROUND: tl.constexpr, TOKENS: tl.constexpr):
    """Grid ``(B,)``: sample ``b`` reads its CLS row ``src[b]`` (width ``Ci``) and the other
    branch's ``N`` patch rows ``other[b]`` (width ``Cj``, ``H`` heads of ``D``), and writes the
    new CLS row ``out[b]``, rounding the Linears' outputs to ``ROUND`` and the block's residual
    sum to the tokens' dtype ``TOKENS``. Scratch row:
    ``x0 | q | y | o`` (``Cj`` each), then ``kt`` and ``z`` (``H·Cj`` each)."""
    b = tl.program_id(0).to(tl.int64)
    ci = tl.arange(0, CI_PAD)
    cj = tl.arange(0, CJ_PAD)
    imask = ci < Ci
    jmask = cj < Cj
    scratch = scratch_ptr + b * s_scratch
    x0_ptr, q_ptr, y_ptr, o_ptr = scratch, scratch + Cj, scratch + 2 * Cj, scratch + 3 * Cj
    kt_ptr = scratch + 4 * Cj
    z_ptr = kt_ptr + H * Cj

    # 1. x0 = Linear_p(GELU(LN_p(cls))), rounded as the Linear's output
    cls = tl.load(src_ptr + b * s_src + ci, mask=imask, other=0.0).to(ACC)
    u = _ln_gelu(cls, imask, Ci, plnw_ptr, plnb_ptr, ci, p_eps)
    _matvec(pw_ptr, pb_ptr, u, ci, Ci, x0_ptr, Cj, x0_ptr, True, False, ROUND, ROUND, BLOCK_OI)
    tl.debug_barrier()

    # 2. q = Wq LN(x0) + bq
    x0 = tl.load(x0_ptr + cj, mask=jmask, other=0.0, cache_modifier=".cg")
    alnw = tl.load(alnw_ptr + cj, mask=jmask, other=0.0).to(ACC)
    alnb = tl.load(alnb_ptr + cj, mask=jmask, other=0.0).to(ACC)
    n0 = _layer_norm_row(x0, jmask, Cj, a_eps)
    _matvec(wq_ptr, bq_ptr, n0 * alnw + alnb, cj, Cj, q_ptr, Cj, q_ptr, HAS_BQ, False, ACC, ACC,
            BLOCK_OJ)
    tl.debug_barrier()

    # 3. kt_h = scale · Wk_hᵀ q_h: the query pushed through each head's key projection
    d = tl.arange(0, D_PAD)
    dmask = d < D
    for h in range(H):
        q_h = tl.load(q_ptr + h * D + d, mask=dmask, other=0.0, cache_modifier=".cg")
        for c0 in range(0, Cj, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            w = tl.load(wk_ptr + (h * D + d)[:, None] * Cj + c[None, :],
                        mask=dmask[:, None] & (c < Cj)[None, :], other=0.0)
            tl.store(kt_ptr + h * Cj + c, tl.sum(w.to(ACC) * q_h[:, None], 0) * scale, mask=c < Cj)
    tl.debug_barrier()

    # 4. the token pass over [x0 ‖ patches]: s_hj = (kt_h ⊙ γ) · n_j + kt_h · β with n_j the
    #    normalized token; online softmax; Σ_j a_hj n_j per head, head by head on each tile
    heads = tl.arange(0, H_PAD)
    hmask = (heads < H)[:, None] & jmask[None, :]
    kt = tl.load(kt_ptr + heads[:, None] * Cj + cj[None, :], mask=hmask, other=0.0,
                 cache_modifier=".cg")
    kb = tl.sum(kt * alnb[None, :], 1)
    m = tl.sum(kt * alnw[None, :] * n0[None, :], 1) + kb   # token 0 (x0): the max so far
    l = tl.full([H_PAD], 1.0, ACC)
    acc = tl.zeros([H_PAD, CJ_PAD], ACC) + n0[None, :]
    for t0 in range(0, N, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < N
        xmask = tmask[:, None] & jmask[None, :]
        x = tl.load(other_ptr + b * s_ob + t[:, None] * s_on + cj[None, :], mask=xmask,
                    other=0.0).to(ACC)
        mean = tl.sum(x, 1) / Cj
        xc = tl.where(xmask, x - mean[:, None], 0.0)
        n = xc / tl.sqrt(tl.sum(xc * xc, 1) / Cj + a_eps)[:, None]
        for head in tl.static_range(H):
            on_h = heads == head
            g_h = alnw * tl.load(kt_ptr + head * Cj + cj, mask=jmask, other=0.0,
                                 cache_modifier=".cg")
            s_h = tl.sum(n * g_h[None, :], 1) + tl.sum(tl.where(on_h, kb, 0.0), 0)
            s_h = tl.where(tmask, s_h, -float("inf"))
            m_h = tl.sum(tl.where(on_h, m, 0.0), 0)
            m_new = tl.maximum(m_h, tl.max(s_h, 0))
            p_h = tl.exp(s_h - m_new)
            alpha = tl.exp(m_h - m_new)
            l = tl.where(on_h, l * alpha + tl.sum(p_h, 0), l)
            acc = tl.where(on_h[:, None], acc * alpha + tl.sum(p_h[:, None] * n, 0)[None, :], acc)
            m = tl.where(on_h, m_new, m)
    z = acc / l[:, None] * alnw[None, :] + alnb[None, :]     # Σ_j a_hj LN(x_j), Σ_j a_hj = 1
    tl.store(z_ptr + heads[:, None] * Cj + cj[None, :], z, mask=hmask)
    tl.debug_barrier()

    # 5. o_h = Wv_h z_h + bv_h
    for h in range(H):
        o = tl.zeros([D_PAD], ACC)
        for c0 in range(0, Cj, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            w = tl.load(wv_ptr + (h * D + d)[:, None] * Cj + c[None, :],
                        mask=dmask[:, None] & (c < Cj)[None, :], other=0.0)
            z_h = tl.load(z_ptr + h * Cj + c, mask=c < Cj, other=0.0, cache_modifier=".cg")
            o += tl.sum(w.to(ACC) * z_h[None, :], 1)
        if HAS_BV:
            o += tl.load(bv_ptr + h * D + d, mask=dmask, other=0.0).to(ACC)
        tl.store(o_ptr + h * D + d, o, mask=dmask)
    tl.debug_barrier()

    # 6. y = x0 + proj(o), proj(o) rounded as a Linear's output, the sum as the block's (in the
    #    tokens' dtype: timm adds to x0 once it is concatenated with the patches)
    o = tl.load(o_ptr + cj, mask=jmask, other=0.0, cache_modifier=".cg")
    _matvec(wo_ptr, bo_ptr, o, cj, Cj, y_ptr, Cj, x0_ptr, HAS_BO, True, ROUND, TOKENS, BLOCK_OJ)
    tl.debug_barrier()

    # 7. out = Linear_r(GELU(LN_r(y)))
    y = tl.load(y_ptr + cj, mask=jmask, other=0.0, cache_modifier=".cg")
    v = _ln_gelu(y, jmask, Cj, rlnw_ptr, rlnb_ptr, cj, r_eps)
    _matvec(rw_ptr, rb_ptr, v, cj, Cj, out_ptr + b * s_out, Ci, out_ptr, True, False, ROUND,
            ROUND, BLOCK_OJ)


# ---- launch -------------------------------------------------------------------------------------

def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def cls_exchange(cls: Tensor, patches: Tensor, out: Tensor, proj: Projection,
                 attn: CrossAttention, revert: Projection,
                 linear_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Write into ``out`` (``[B, Ci]``, unit last stride) the exchanged CLS rows of ``cls``
    (``[B, Ci]`` rows) against ``patches`` (``[B, N, Cj]``, unit last stride; a strided view of
    the other branch's tokens is read in place). All tensors on one device, in one dtype;
    :func:`fits` the widths and heads. ``linear_dtype``: the dtype timm's Linears would write
    (autocast's under autocast; None: the tokens'), which the Linears' outputs are rounded to.
    Returns ``out``."""
    B, Ci = cls.shape
    _, N, Cj = patches.shape
    H = attn.num_heads
    D = Cj // H
    acc = acc_dtype(cls.dtype)
    scratch = torch.empty((B, 4 * Cj + 2 * H * Cj), device=cls.device, dtype=acc)
    p = [_contiguous(t) for t in (proj.ln_weight, proj.ln_bias, proj.weight, proj.bias)]
    a = [_contiguous(t) for t in (attn.ln_weight, attn.ln_bias, attn.wq_weight, attn.wq_bias,
                                  attn.wk_weight, attn.wv_weight, attn.wv_bias,
                                  attn.proj_weight, attn.proj_bias)]
    r = [_contiguous(t) for t in (revert.ln_weight, revert.ln_bias, revert.weight, revert.bias)]
    a = [p[0] if t is None else t for t in a]    # an absent bias: any pointer (never read)
    if B > 0:
        _cls_exchange_kernel[(B,)](
            cls, cls.stride(0), patches, patches.stride(0), patches.stride(1), out, out.stride(0),
            scratch, scratch.stride(0), *p, *a, *r,
            Ci, Cj, N, H, D, float(attn.scale),
            float(proj.eps), float(attn.eps), float(revert.eps),
            attn.wq_bias is not None, attn.wv_bias is not None, attn.proj_bias is not None,
            CI_PAD=max(16, next_power_of_2(Ci)), CJ_PAD=max(16, next_power_of_2(Cj)),
            D_PAD=next_power_of_2(D), H_PAD=next_power_of_2(H),
            BLOCK_N=_rows_per_tile(Cj), BLOCK_OI=_rows_per_tile(Ci), BLOCK_OJ=_rows_per_tile(Cj),
            BLOCK_C=BLOCK_C, ACC=_TL_DTYPE[acc], ROUND=_TL_DTYPE[linear_dtype or cls.dtype],
            TOKENS=_TL_DTYPE[cls.dtype], num_warps=NUM_WARPS,
            maxnreg=MAX_REGISTERS)
    return out

