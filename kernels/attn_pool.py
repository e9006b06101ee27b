"""The token pass of the single-query cross-attention (design.md §2), forward and backward.

One program walks a contiguous range of the ``T = N + 1`` tokens ``[x0 ‖ patches]`` of one sample
(token 0 is the CLS token ``x0``, token ``t ≥ 1`` is ``patches[:, t - 1]``; the two are read through
their own pointers and strides, never concatenated). Per block of ``BLOCK_N`` tokens it computes the
LayerNorm statistics, the scores of all heads with one ``tl.dot`` (heads padded to ``H_PAD ≥ 16``,
the smallest dot), and, forward, an online softmax with the weighted sums of the normalized tokens;
backward, the token gradients and partial parameter gradients. Whole rows (``BLOCK_C =
next_power_of_2(C)``) live in registers, so K, V, the normalized tokens and the scores never reach
global memory.

With few samples the token axis is split across programs (flash-decoding): each split writes a
partial (max, sum, unnormalized accumulator) that a small combine kernel reduces; the backward's
per-split parameter-gradient partials are summed by the caller.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import (LOW_PRECISION_DOT, acc_dtype, cdiv, contiguous_as, direct, next_power_of_2,
                      num_sms, tl_dtypes, unit_last_stride)

# A split of the token axis gets at least about this many tokens.
MIN_SPLIT_TOKENS = 64


def _tl_dtypes(dtype: torch.dtype, dot_dtype: Optional[torch.dtype] = None):
    """``(ACC, DOT, SCORES_ON_N)`` for activations of ``dtype``: the accumulation dtype, the dtype
    of ``tl.dot`` operands, and whether the scores are taken on the normalized tokens.

    Low-precision dots run on the activation dtype (tensor cores), or on ``dot_dtype`` (fp16/bf16)
    where the caller allows it for fp32 activations (autocast). Then the scores use the
    normalized tile rounded to ``dot_dtype``, as timm rounds the LayerNorm output for its K
    projection; rounding the raw tokens instead would lose their mean's digits.
    """
    acc, dot = tl_dtypes(dtype)
    if dot_dtype in LOW_PRECISION_DOT and dtype == torch.float32:
        return acc, LOW_PRECISION_DOT[dot_dtype], True
    return acc, dot, False


# Forward (BLOCK_N, num_warps) by BLOCK_C. At crossvit_18_240's shapes and batch 256 on an H100
# (scripts/tune_attn_pool.py sweep, bf16): C = 448 ran fastest with 16-token tiles and 4 warps
# (67 µs; 81 µs with 32 and 8), C = 224 with 32-token tiles and 8 warps (75 µs; 93 µs with 32
# and 4). Narrower rows take 32 tokens and 4 warps, wider ones (1024) 16 tokens and 8 warps:
# not swept.
_FORWARD_TILES = {16: (32, 4), 32: (32, 4), 64: (32, 4), 128: (32, 4), 256: (32, 8), 512: (16, 4)}


@functools.lru_cache(maxsize=None)
def _blocks(C: int, H: int, backward: bool) -> Tuple[int, int, int, int]:
    """``(BLOCK_C, H_PAD, BLOCK_N, num_warps)``: a handful of shapes, chosen by width and heads.
    Callers pass plain ints: under the compiler with dynamic shapes the sizes are SymInts, which
    do not hash, and the kernels' blocks need a fixed width and head count anyway (``int()``
    specializes them).

    Whole rows in registers. The backward holds several tiles live: 8K-element tiles from
    BLOCK_C = 256 up (16 to 32 tokens), 32 tokens below.
    """
    block_c = max(16, next_power_of_2(C))
    h_pad = max(16, next_power_of_2(H))
    if backward:
        return block_c, h_pad, max(16, min(32, 8192 // block_c)), (4 if block_c <= 256 else 8)
    block_n, num_warps = _FORWARD_TILES.get(block_c, (16, 8))
    return block_c, h_pad, block_n, num_warps


def _splits(B: int, T: int, block_n: int, device: torch.device,
            splits: Optional[int]) -> Tuple[int, int]:
    """``(num_splits, chunk)``: split the tokens when B alone cannot fill the GPU (B < 1.5·SMs;
    at B = 256 on an H100's 132 SMs two splits ran 5% slower than one).

    ``chunk`` (tokens per split) is a multiple of ``block_n`` and every split gets at least one
    token. ``splits`` forces a number of splits (tests, benchmarks).
    """
    if splits is None:
        sms = num_sms(device)
        B = max(1, B)   # no samples: nothing is launched, any split will do
        splits = 1 if 2 * B >= 3 * sms else min(cdiv(2 * sms, B), cdiv(T, MIN_SPLIT_TOKENS))
    chunk = cdiv(cdiv(T, max(1, splits)), block_n) * block_n
    return cdiv(T, chunk), chunk


@triton.jit
def _token_ptrs(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn):
    """Pointers ``[BLOCK_N, BLOCK_C]`` to tokens ``t`` of sample ``b`` (token 0 is ``x0``) and the
    mask of those below ``end``."""
    mask = (t < end)[:, None] & (cols < C)[None, :]
    ptrs = tl.where((t == 0)[:, None], x0_ptr + b * s_x0b + cols[None, :],
                    p_ptr + b * s_pb + (t - 1)[:, None] * s_pn + cols[None, :])
    return ptrs, mask


@triton.jit
def _normalize(x, mask, C, eps):
    """LayerNorm statistics of the rows of ``x`` (zero outside ``mask``): ``(mean, rstd, n)``."""
    mean = tl.sum(x, 1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
    return mean, rstd, xc * rstd[:, None]


@triton.jit
def _scores(g, gsum, kb, x, n, mean, rstd, DOT: tl.constexpr, ON_N: tl.constexpr):
    """``s[h, j] = g_h · n_j + kt_h · β``: one dot, on the normalized tokens ``n`` (``ON_N``) or
    on the raw ones, exact in their own dtype, as ``r_j (g_h · x_j − μ_j Σ_c g_hc)``."""
    if ON_N:
        return tl.dot(g, tl.trans(n.to(DOT)), input_precision="ieee") + kb[:, None]
    gx = tl.dot(g, tl.trans(x.to(DOT)), input_precision="ieee")
    return rstd[None, :] * (gx - mean[None, :] * gsum[:, None]) + kb[:, None]


@triton.jit
def _head_params(kt_ptr, s_ktb, s_kth, gamma_ptr, beta_ptr, b, heads, cols, H, C,
                 ACC: tl.constexpr, DOT: tl.constexpr):
    """``kt`` of sample ``b`` (strides ``s_ktb``, ``s_kth``, unit column stride), γ, β, and the
    absorbed score weights ``g = kt ⊙ γ`` (as dot operand), ``Σ_c g`` (of that rounded ``g``, so
    the centring is exact) and ``kt · β``."""
    hc_mask = (heads < H)[:, None] & (cols < C)[None, :]
    kt = tl.load(kt_ptr + b * s_ktb + heads[:, None] * s_kth + cols[None, :], mask=hc_mask,
                 other=0.0).to(ACC)
    gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)
    g = (kt * gamma[None, :]).to(DOT)
    return kt, gamma, beta, g, tl.sum(g.to(ACC), 1), tl.sum(kt * beta[None, :], 1), hc_mask


@triton.jit(do_not_specialize=["T", "chunk"])
def _attn_pool_fwd_kernel(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, out_ptr, lse_ptr, l_ptr,
                          T, C, H, chunk, s_x0b, s_pb, s_pn, s_ktb, s_kth, eps: tl.constexpr,
                          H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                          ACC: tl.constexpr, DOT: tl.constexpr, SCORES_ON_N: tl.constexpr,
                          FINAL: tl.constexpr):
    """Grid ``(B, splits)``. ``FINAL`` (one split): writes ``z`` to ``out`` and ``lse``. Otherwise
    writes this split's partials: unnormalized ``Σ p n`` to ``out`` ``[B, S, H, C]``, running max
    to ``lse`` and sum to ``l`` (``[B, S, H]``)."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    heads = tl.arange(0, H_PAD)
    cols = tl.arange(0, BLOCK_C)
    kt, gamma, beta, g, gsum, kb, hc_mask = _head_params(kt_ptr, s_ktb, s_kth, gamma_ptr, beta_ptr,
                                                         b, heads, cols, H, C, ACC, DOT)
    m = tl.full([H_PAD], float("-inf"), ACC)
    l = tl.zeros([H_PAD], ACC)
    acc = tl.zeros([H_PAD, BLOCK_C], ACC)
    start = split * chunk
    end = tl.minimum(start + chunk, T)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        ptrs, mask = _token_ptrs(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn)
        x = tl.load(ptrs, mask=mask, other=0.0)
        mean, rstd, n = _normalize(x.to(ACC), mask, C, eps)
        s = tl.where((t < end)[None, :], _scores(g, gsum, kb, x, n, mean, rstd, DOT, SCORES_ON_N),
                     float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))          # finite: every block has a token
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), n.to(DOT), input_precision="ieee")
        m = m_new
    row = b * tl.num_programs(1) + split
    if FINAL:
        z = gamma[None, :] * (acc / l[:, None]) + beta[None, :]
        tl.store(out_ptr + (row * H + heads[:, None]) * C + cols[None, :], z, mask=hc_mask)
        tl.store(lse_ptr + row * H + heads, m + tl.log(l), mask=heads < H)
    else:
        tl.store(out_ptr + (row * H + heads[:, None]) * C + cols[None, :], acc, mask=hc_mask)
        tl.store(lse_ptr + row * H + heads, m, mask=heads < H)
        tl.store(l_ptr + row * H + heads, l, mask=heads < H)


@triton.jit(do_not_specialize=["T", "chunk"])
def _attn_pool_bwd_kernel(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, z_ptr, dz_ptr, lse_ptr,
                          dx0_ptr, dp_ptr, dkt_ptr, dgamma_ptr, dbeta_ptr,
                          T, C, H, chunk, s_x0b, s_pb, s_pn, s_ktb, s_kth, s_dzb, s_dzh,
                          s_dx0b, s_dpb, s_dpn, eps: tl.constexpr,
                          H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                          ACC: tl.constexpr, DOT: tl.constexpr, SCORES_ON_N: tl.constexpr):
    """Grid ``(B, splits)``. Writes ``dx`` of this split's tokens and the split's partial
    ``dkt`` (``[B, S, H, C]``), ``dγ`` and ``dβ`` (``[B·S, C]``), summed by the caller.

    Per token: ``a = exp(s − lse)``, ``ds = a (dz·x̂ − δ)`` with ``dz·x̂ = (dz⊙γ)·n + dz·β``,
    ``dx̂ = Σ_h a dz_h + ds kt_h``, then LayerNorm's backward. ``dkt = γ ⊙ Σ ds n + β Σ ds``."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    heads = tl.arange(0, H_PAD)
    cols = tl.arange(0, BLOCK_C)
    kt, gamma, beta, g, gsum, kb, hc_mask = _head_params(kt_ptr, s_ktb, s_kth, gamma_ptr, beta_ptr,
                                                         b, heads, cols, H, C, ACC, DOT)
    hc_offs = (b * H + heads[:, None]) * C + cols[None, :]
    dz = tl.load(dz_ptr + b * s_dzb + heads[:, None] * s_dzh + cols[None, :], mask=hc_mask,
                 other=0.0).to(ACC)
    delta = tl.sum(dz * tl.load(z_ptr + hc_offs, mask=hc_mask, other=0.0), 1)
    lse = tl.load(lse_ptr + b * H + heads, mask=heads < H, other=0.0)
    dzg = (dz * gamma[None, :]).to(DOT)
    dzb = tl.sum(dz * beta[None, :], 1)
    dz_op = dz.to(DOT)
    kt_op = kt.to(DOT)
    dkt = tl.zeros([H_PAD, BLOCK_C], ACC)
    ds_sum = tl.zeros([H_PAD], ACC)
    dgamma = tl.zeros([BLOCK_C], ACC)
    dbeta = tl.zeros([BLOCK_C], ACC)
    start = split * chunk
    end = tl.minimum(start + chunk, T)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        ptrs, mask = _token_ptrs(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn)
        x = tl.load(ptrs, mask=mask, other=0.0)
        mean, rstd, n = _normalize(x.to(ACC), mask, C, eps)
        s = _scores(g, gsum, kb, x, n, mean, rstd, DOT, SCORES_ON_N)
        a = tl.where((heads < H)[:, None] & (t < end)[None, :], tl.exp(s - lse[:, None]), 0.0)
        n_op = n.to(DOT)
        da = tl.dot(dzg, tl.trans(n_op), input_precision="ieee") + dzb[:, None]
        ds = a * (da - delta[:, None])
        dxhat = (tl.dot(tl.trans(a.to(DOT)), dz_op, input_precision="ieee")
                 + tl.dot(tl.trans(ds.to(DOT)), kt_op, input_precision="ieee"))
        dn = dxhat * gamma[None, :]
        dx = (dn - (tl.sum(dn, 1) / C)[:, None] - n * (tl.sum(dn * n, 1) / C)[:, None]) * rstd[:, None]
        dptrs, _ = _token_ptrs(dx0_ptr, dp_ptr, b, t, cols, end, C, s_dx0b, s_dpb, s_dpn)
        tl.store(dptrs, dx.to(dx0_ptr.dtype.element_ty), mask=mask)
        dkt += tl.dot(ds.to(DOT), n_op, input_precision="ieee")
        ds_sum += tl.sum(ds, 1)
        dgamma += tl.sum(dxhat * n, 0)
        dbeta += tl.sum(dxhat, 0)
    row = b * tl.num_programs(1) + split
    dkt = gamma[None, :] * dkt + beta[None, :] * ds_sum[:, None]
    tl.store(dkt_ptr + (row * H + heads[:, None]) * C + cols[None, :], dkt, mask=hc_mask)
    tl.store(dgamma_ptr + row * C + cols, dgamma, mask=cols < C)
    tl.store(dbeta_ptr + row * C + cols, dbeta, mask=cols < C)


@triton.jit
def _attn_pool_combine_kernel(out_ptr, m_ptr, l_ptr, gamma_ptr, beta_ptr, z_ptr, lse_ptr, S, H, C,
                              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(B, H)``: the flash-decoding combine of the ``S`` split partials of one sample and
    head. Each split is rescaled to the global max, then ``z = γ ⊙ Σ w acc / Σ w l + β`` and
    ``lse = max + log Σ w l`` (every split holds at least one token, so every max is finite)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_C)
    rows = (b * S + splits) * H + h
    m = tl.load(m_ptr + rows, mask=splits < S, other=float("-inf"))
    l = tl.load(l_ptr + rows, mask=splits < S, other=0.0)
    m_all = tl.max(m, 0)
    w = tl.exp(m - m_all)
    l_all = tl.sum(w * l, 0)
    acc = tl.load(out_ptr + rows[:, None] * C + cols[None, :],
                  mask=(splits < S)[:, None] & (cols < C)[None, :], other=0.0)
    gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)
    z = gamma * (tl.sum(acc * w[:, None], 0) / l_all) + beta
    tl.store(z_ptr + (b * H + h) * C + cols, z, mask=cols < C)
    tl.store(lse_ptr + b * H + h, m_all + tl.log(l_all))


def attn_pool_fwd(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                  eps: float, dot_dtype: Optional[torch.dtype] = None,
                  splits: Optional[int] = None, launch=direct) -> Tuple[Tensor, Tensor]:
    """``(z [B, H, C], lse [B, H])`` in the accumulation dtype; see ``torch_backend.attn_pool_fwd``.

    ``dot_dtype`` (fp16/bf16) lets fp32 tokens meet the tensor cores (see :func:`_tl_dtypes`);
    ``splits`` forces the number of token splits (default: the heuristic of :func:`_splits`);
    ``launch`` makes each kernel launchable (``_launch.traced`` inside a ``triton_op``).
    """
    B, N, C = patches.shape
    H = kt.shape[1]
    acc = acc_dtype(x0.dtype)
    ACC, DOT, ON_N = _tl_dtypes(x0.dtype, dot_dtype)
    x0, patches, kt = unit_last_stride(x0), unit_last_stride(patches), unit_last_stride(kt)
    gamma, beta = contiguous_as(gamma, acc), contiguous_as(beta, acc)
    block_c, h_pad, block_n, num_warps = _blocks(int(C), int(H), backward=False)
    S, chunk = _splits(B, N + 1, block_n, x0.device, splits)
    z = x0.new_empty((B, H, C), dtype=acc)
    lse = x0.new_empty((B, H), dtype=acc)
    if S == 1:
        # l is not read or written with one split: None, not lse again. A tensor passed twice is
        # two kernel outputs to the compiler's functionalization (where it cannot tell which
        # arguments a kernel writes, it clones each and keeps the last: lse would be l's clone)
        out, m, l = z, lse, None
    else:
        out = x0.new_empty((B, S, H, C), dtype=acc)
        m, l = x0.new_empty((B, S, H), dtype=acc), x0.new_empty((B, S, H), dtype=acc)
    if B == 0:
        return z, lse
    launch(_attn_pool_fwd_kernel)[(B, S)](
        x0, patches, kt, gamma, beta, out, m, l, N + 1, C, H, chunk,
        x0.stride(0), patches.stride(0), patches.stride(1), kt.stride(0), kt.stride(1), eps,
        H_PAD=h_pad, BLOCK_N=block_n, BLOCK_C=block_c, ACC=ACC, DOT=DOT, SCORES_ON_N=ON_N,
        FINAL=S == 1, num_warps=num_warps, num_stages=1)
    if S > 1:
        launch(_attn_pool_combine_kernel)[(B, H)](out, m, l, gamma, beta, z, lse, S, H, C,
                                          BLOCK_S=next_power_of_2(S), BLOCK_C=block_c,
                                          num_warps=4)
    return z, lse


def attn_pool_bwd(dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                  beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                  dot_dtype: Optional[torch.dtype] = None, splits: Optional[int] = None,
                  launch=direct) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx0, dpatches, dkt, dgamma, dbeta)``; see ``torch_backend.attn_pool_bwd``. ``dot_dtype``
    must be the forward's, so that the scores recomputed here are the forward's."""
    B, N, C = patches.shape
    H = kt.shape[1]
    acc = acc_dtype(x0.dtype)
    ACC, DOT, ON_N = _tl_dtypes(x0.dtype, dot_dtype)
    x0, patches = unit_last_stride(x0), unit_last_stride(patches)
    kt, dz = unit_last_stride(kt), unit_last_stride(dz)
    gamma, beta, z, lse = (contiguous_as(t, acc) for t in (gamma, beta, z, lse))
    block_c, h_pad, block_n, num_warps = _blocks(int(C), int(H), backward=True)
    S, chunk = _splits(B, N + 1, block_n, x0.device, splits)
    dx0 = torch.empty_like(x0, memory_format=torch.contiguous_format)
    dpatches = patches.new_empty((B, N, C))
    if B == 0:
        return dx0, dpatches, x0.new_empty((0, H, C), dtype=acc), *x0.new_zeros((2, C), dtype=acc)
    dkt = x0.new_empty((B, S, H, C), dtype=acc)
    dgamma, dbeta = x0.new_empty((B * S, C), dtype=acc), x0.new_empty((B * S, C), dtype=acc)
    # One token tile in flight (num_stages=1): pipelining keeps several [BLOCK_N, BLOCK_C] tiles
    # in shared memory, which took fp32 rows of 448 columns past an H100's 227 KB.
    launch(_attn_pool_bwd_kernel)[(B, S)](
        x0, patches, kt, gamma, beta, z, dz, lse, dx0, dpatches, dkt, dgamma, dbeta,
        N + 1, C, H, chunk, x0.stride(0), patches.stride(0), patches.stride(1),
        kt.stride(0), kt.stride(1), dz.stride(0), dz.stride(1),
        dx0.stride(0), dpatches.stride(0), dpatches.stride(1), eps,
        H_PAD=h_pad, BLOCK_N=block_n, BLOCK_C=block_c, ACC=ACC, DOT=DOT, SCORES_ON_N=ON_N,
        num_warps=num_warps, num_stages=1)
    return (dx0, dpatches, dkt.view(B, H, C) if S == 1 else dkt.sum(dim=1), dgamma.sum(dim=0),
            dbeta.sum(dim=0))
