"""The token pass of the single-query cross-attention (design.md §2), forward and backward, in
channel tiles: no program holds a whole row, so shared memory and registers do not grow with the
width C and every kernel fits every GPU from the A100 on.

The ``T = N + 1`` tokens ``[x0 ‖ patches]`` of a sample (token 0 is the CLS token ``x0``, token
``t ≥ 1`` is ``patches[:, t - 1]``; read through their own pointers and strides, never
concatenated) go through two kinds of kernel:

* **token kernels**, grid ``(B, token groups)``: a program takes a few tokens and sweeps their rows
  one channel tile at a time, for what needs the whole row: the LayerNorm statistics (merged tile by
  tile, :mod:`._stats`), every head's score ``s_hj = g_h · n_j + kt_h · β`` (a ``tl.dot`` per tile,
  heads padded to ``H_PAD ≥ 16``, the smallest dot) and, backward, the token gradients (the
  LayerNorm backward's two row sums from one sweep, ``dx`` from the next).
* **pooling kernels**, grid ``(B, channel tiles, token splits)``: a program walks its token split and
  accumulates, for its channel tile only, the weighted sums of the normalized tokens: forward
  ``Σ_j a_hj n_j`` (then ``z = γ ⊙ Σ + β``), backward ``Σ_j a_hj n_j`` and ``Σ_j ds_hj n_j``, from
  which the parameter gradients follow without forming ``dx̂`` (design.md §2).

The scores are exact before the pooling kernels run (the forward's token kernel writes them, and per
token group a max and a sum of exponentials, from which every pooling program takes the
log-sum-exp), so the splits' partial sums are already normalized: combining them is a sum.
A program re-reads its rows for each sweep from the cache, not from memory.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import (LOW_PRECISION_DOT, acc_dtype, cdiv, contiguous_as, direct, next_power_of_2,
                      num_sms, tl_dtypes, token_rows, unit_last_stride)
from ._stats import merge_tile_stats, rstd_of

# A split of the pooling kernels' token axis gets at least about this many tokens.
MIN_SPLIT_TOKENS = 32
# Programs per SM a launch aims for where the batch allows it (occupancy hides memory latency).
PROGRAMS_PER_SM = 4
# Two tiles in flight per loop: three (Triton's default) spilled registers in the fp32 backward
# (bench.kernel_resources, sm_86) for no more overlap than two give to a memory-bound pass.
NUM_STAGES = 2


def _tl_dtypes(dtype: torch.dtype, dot_dtype: Optional[torch.dtype] = None):
    """``(ACC, DOT, SCORES_ON_N)`` for activations of ``dtype``: the accumulation dtype, the dtype
    of ``tl.dot`` operands, and whether the scores are taken on the normalized tokens.

    Low-precision dots run on the activation dtype (tensor cores), or on ``dot_dtype`` (fp16/bf16)
    where the caller allows it for fp32 activations (autocast). Then the scores use the
    normalized tile rounded to ``dot_dtype``, as timm rounds the LayerNorm output for its K
    projection; rounding the raw tokens instead would lose their mean's digits. fp32 and fp64
    tokens also take the scores on the normalized tile (the dots are as wide as the tokens): on
    the raw tokens the products would cancel against ``μ Σ g`` and lose the mean's digits. Only
    16-bit tokens take the dots on the raw tokens, exact in their own dtype where the normalized
    tile would be rounded.
    """
    acc, dot = tl_dtypes(dtype)
    if dot_dtype in LOW_PRECISION_DOT and dtype == torch.float32:
        return acc, LOW_PRECISION_DOT[dot_dtype], True
    return acc, dot, dtype in (torch.float32, torch.float64)


class Plan(NamedTuple):
    """Tiles and grids of one call (the same forward and backward, so that the backward's scores
    are the forward's)."""
    h_pad: int          # heads, padded for tl.dot
    block_n: int        # token tile of every kernel
    tokens: int         # tokens per token-kernel program (≤ block_n; fewer fill small batches)
    block_k: int        # channel tile of the token kernels' sweeps
    block_c: int        # channel tile of a pooling program
    splits: int         # token splits of the pooling kernels
    chunk: int          # tokens per split, a multiple of block_n
    warps: int          # num_warps of the pooling kernels
    pool_bwd_stages: int  # pipeline stages of the pooling backward
    token_warps: int    # num_warps of the token kernels (scores, maps, token backward)
    token_stages: int   # their pipeline stages
    token_bwd_warps: int  # num_warps of the token backward

    def token_groups(self, T: int) -> int:
        return cdiv(T, self.tokens)


@functools.lru_cache(maxsize=None)
def plan(B: int, T: int, C: int, H: int, sms: int, splits: Optional[int] = None,
         wide_dots: bool = False) -> Plan:
    """Tiles chosen so that each launch has about ``PROGRAMS_PER_SM`` programs per SM where the
    batch allows, and at least one per SM down to small batches: the token tile shrinks (down to
    4 tokens per program, masked inside a 16-token tile: the smallest dot) and the pooling
    kernels take narrower channel tiles, then split the tokens (flash-decoding). ``splits``
    forces the number of splits (tests, benchmarks). ``wide_dots``: the dots take 4-byte
    operands (fp32 without autocast: FMA products, not tensor cores), so the tiles are halved to
    stay clear of spills. Plain ints (``int()`` of SymInts under the compiler): the tiles are
    constants of the kernels anyway.
    """
    B = max(1, B)   # no samples: nothing is launched, any plan will do
    target = PROGRAMS_PER_SM * sms
    widest = 32 if wide_dots else 64
    block_n = next((n for n in (64, 32) if n <= widest and B * cdiv(T, n) >= target), 16)
    tokens = block_n
    while tokens > 4 and B * cdiv(T, tokens) < sms:
        tokens //= 2
    block_c = next((c for c in (64, 32) if c <= widest and B * cdiv(C, c) >= target), 16)
    if splits is None:
        programs = B * cdiv(C, block_c)
        splits = 1 if programs >= sms else min(cdiv(2 * sms, programs), cdiv(T, MIN_SPLIT_TOKENS))
    chunk = cdiv(cdiv(T, max(1, splits)), block_n) * block_n
    block_k = min(widest, max(16, next_power_of_2(C)))
    block_c = min(block_c, block_k)
    # Tiles of 32 tokens and more take 8 warps: with 4, the token kernels spilled registers on
    # sm_80 and the pooling forward on sm_86/89. The pooling backward's two accumulators leave
    # room for a second tile in flight only on channel tiles narrower than 64 (with one stage
    # those spilled, with two the 64-wide ones: bench.kernel_resources, Triton 3.8 and 3.9).
    # The token kernels take 8 warps on 16-token tiles too, with one stage: under Triton 3.6 four
    # warps spilled (the maps kernel in bf16 on sm_90), and two stages the fp32 token backward on
    # sm_90. The token backward on 16-token tiles with 16-bit dots takes 4 warps: with 8, Triton
    # 3.9's binaries spilled 8 B under autocast on sm_90 (its ptxas trades them for occupancy),
    # and with 4 its fp32 one on sm_80 (registers and stack of the binaries, Triton 3.6 and 3.9).
    return Plan(h_pad=max(16, next_power_of_2(H)), block_n=block_n, tokens=tokens,
                block_k=block_k, block_c=block_c, splits=cdiv(T, chunk), chunk=chunk,
                warps=8 if block_n >= 32 else 4, pool_bwd_stages=2 if block_c < 64 else 1,
                token_warps=8, token_stages=NUM_STAGES if block_n >= 32 else 1,
                token_bwd_warps=8 if block_n >= 32 or wide_dots else 4)


@functools.lru_cache(maxsize=None)
def interpreter_plan(B: int, T: int, C: int, H: int, splits: Optional[int] = None) -> Plan:
    """The fewest programs and loop steps, for Triton's interpreter (CPU tensors), where a program
    costs about the same whatever its tiles and a run of the test suite is made of thousands of
    launches: whole rows, up to 256 tokens per program, the tokens split only where asked.
    (Each call of a ``@triton.jit`` helper re-patches ``triton.language`` there, about 4 ms: the
    tiled GPU plan made the suite several times slower.)"""
    block_k = max(16, next_power_of_2(C))
    block_n = min(256, max(16, next_power_of_2(T)))
    chunk = cdiv(cdiv(T, max(1, splits or 1)), block_n) * block_n
    return Plan(h_pad=max(16, next_power_of_2(H)), block_n=block_n, tokens=block_n,
                block_k=block_k, block_c=block_k, splits=cdiv(T, chunk), chunk=chunk, warps=4,
                pool_bwd_stages=1, token_warps=4, token_stages=1, token_bwd_warps=4)


# Tests of the kernels set this to plan CPU tensors as for a GPU (tiles, token groups, splits).
GPU_PLAN_ON_CPU = False


def _plan_for(x0: Tensor, patches: Tensor, kt: Tensor, splits: Optional[int],
              dot_dtype: Optional[torch.dtype]) -> Plan:
    B, N, C = patches.shape
    B, T, C, H = int(B), int(N) + 1, int(C), int(kt.shape[1])
    if x0.device.type == "cpu" and not GPU_PLAN_ON_CPU:
        return interpreter_plan(B, T, C, H, splits)
    wide = x0.dtype in (torch.float32, torch.float64) and dot_dtype not in LOW_PRECISION_DOT
    return plan(B, T, C, H, num_sms(x0.device), splits, wide)


# ---- helpers ------------------------------------------------------------------------------------

@triton.jit
def _token_ptrs(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn):
    """Pointers ``[BLOCK_N, BLOCK]`` to channels ``cols`` of tokens ``t`` of sample ``b`` (token 0
    is ``x0``) and the mask of the tokens below ``end`` and channels below ``C``."""
    mask = (t < end)[:, None] & (cols < C)[None, :]
    ptrs = tl.where((t == 0)[:, None], x0_ptr + b * s_x0b + cols[None, :],
                    p_ptr + b * s_pb + (t - 1)[:, None] * s_pn + cols[None, :])
    return ptrs, mask


@triton.jit
def _head_tile(ptr, s_b, s_h, b, heads, cols, H, C):
    """Tile ``[H_PAD, BLOCK]`` of a per-head ``[B, H, C]`` tensor (unit column stride), zero
    outside the heads and channels; and its mask."""
    mask = (heads < H)[:, None] & (cols < C)[None, :]
    return tl.load(ptr + b * s_b + heads[:, None] * s_h + cols[None, :], mask=mask, other=0.0), mask


@triton.jit
def _row_stats(x0_ptr, p_ptr, b, t, end, C, s_x0b, s_pb, s_pn, eps: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """``(mean, rstd)`` of tokens ``t`` over the whole width, one channel tile at a time."""
    mean = tl.zeros([BLOCK_N], ACC)
    m2 = tl.zeros([BLOCK_N], ACC)
    for c0 in range(0, C, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        ptrs, mask = _token_ptrs(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn)
        x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
        mean, m2 = merge_tile_stats(mean, m2, c0, x, mask, tl.minimum(BLOCK_K, C - c0))
    return mean, rstd_of(m2, C, eps)


@triton.jit
def _normalized(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn, mean, rstd,
                ACC: tl.constexpr):
    """The raw tile of tokens ``t`` at channels ``cols``, its normalized ``n`` (zero outside the
    mask) and the mask."""
    ptrs, mask = _token_ptrs(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn)
    x = tl.load(ptrs, mask=mask, other=0.0)
    n = tl.where(mask, (x.to(ACC) - mean[:, None]) * rstd[:, None], 0.0)
    return x, n, mask


@triton.jit
def _scores(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, w_ptr, b, t, end, heads, mean, rstd,
            C, H, s_x0b, s_pb, s_pn, s_ktb, s_kth, s_wb, s_wh,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, H_PAD: tl.constexpr,
            ACC: tl.constexpr, DOT: tl.constexpr, ON_N: tl.constexpr, WITH_W: tl.constexpr):
    """The parts of the scores ``s_hj = g_h · n_j + kt_h · β`` of tokens ``t`` (``g = kt ⊙ γ``):
    ``(g·n [H_PAD, BLOCK_N], kt·β, Σ_c g [H_PAD])``; with ``WITH_W`` also ``(gw·n, w·β, Σ_c gw)``
    for a second per-head vector ``w`` (the backward's ``dz``; ``gw = w ⊙ γ``), whose sum is
    ``w_h · x̂_j``. One ``tl.dot`` per channel tile each.

    ``ON_N``: the dots take the normalized tile in ``DOT`` (fp32/fp64 tokens, and autocast's
    rounded one). Otherwise (16-bit tokens) they take the raw tokens, exact in their own dtype, as
    ``r_j (g_h · x_j − μ_j Σ_c g_hc)``, with ``Σ g`` of the rounded ``g`` so that the centring is
    exact."""
    gx = tl.zeros([H_PAD, BLOCK_N], ACC)
    gsum = tl.zeros([H_PAD], ACC)
    kb = tl.zeros([H_PAD], ACC)
    wx = tl.zeros([H_PAD, BLOCK_N], ACC)
    wsum = tl.zeros([H_PAD], ACC)
    wb = tl.zeros([H_PAD], ACC)
    for c0 in range(0, C, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        x, n, _ = _normalized(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn, mean, rstd, ACC)
        tokens = n.to(DOT) if ON_N else x.to(DOT)
        gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0)
        beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)
        kt, _ = _head_tile(kt_ptr, s_ktb, s_kth, b, heads, cols, H, C)
        g = (kt.to(ACC) * gamma[None, :]).to(DOT)
        gx += tl.dot(g, tl.trans(tokens), input_precision="ieee")
        gsum += tl.sum(g.to(ACC), 1)
        kb += tl.sum(kt * beta[None, :], 1)
        if WITH_W:
            w, _ = _head_tile(w_ptr, s_wb, s_wh, b, heads, cols, H, C)
            wg = (w.to(ACC) * gamma[None, :]).to(DOT)
            wx += tl.dot(wg, tl.trans(tokens), input_precision="ieee")
            wsum += tl.sum(wg.to(ACC), 1)
            wb += tl.sum(w * beta[None, :], 1)
    if not ON_N:
        gx = rstd[None, :] * (gx - mean[None, :] * gsum[:, None])
        wx = rstd[None, :] * (wx - mean[None, :] * wsum[:, None])
    return gx, kb, gsum, wx, wb, wsum


@triton.jit
def _log_sum_exp(m_ptr, l_ptr, b, heads, H, G, BLOCK_G: tl.constexpr, H_PAD: tl.constexpr,
                 ACC: tl.constexpr):
    """Per-head log-sum-exp of sample ``b``'s scores from the ``G`` token groups' maxima and sums
    of exponentials (``[B, G, H]``); 0 for the padded heads."""
    m_all = tl.full([H_PAD], float("-inf"), ACC)
    l_all = tl.zeros([H_PAD], ACC)
    for g0 in range(0, G, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)
        mask = (groups < G)[:, None] & (heads < H)[None, :]
        offs = (b * G + groups[:, None]) * H + heads[None, :]
        m = tl.load(m_ptr + offs, mask=mask, other=float("-inf"))
        l = tl.load(l_ptr + offs, mask=mask, other=0.0)
        m_new = tl.maximum(m_all, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # padded heads: no groups
        l_all = l_all * tl.exp(m_all - m_safe) + tl.sum(l * tl.exp(m - m_safe[None, :]), 0)
        m_all = m_new
    return tl.where(heads < H, m_all + tl.log(tl.where(heads < H, l_all, 1.0)), 0.0)


# ---- forward ------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["T", "tokens"])
def _scores_kernel(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, s_ptr, mean_ptr, rstd_ptr,
                   m_ptr, l_ptr, lse_ptr, T, C, H, tokens, s_x0b, s_pb, s_pn, s_ktb, s_kth,
                   eps: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                   ON_N: tl.constexpr, MAPS: tl.constexpr):
    """Grid ``(B, G)``: the scores of ``tokens`` tokens of one sample.

    Forward: writes the scores ``s [B, H, T]``, the tokens' mean and rstd ``[B, T]``, and the
    group's max and sum of exponentials per head (``m``, ``l``: ``[B, G, H]``). ``MAPS``: writes
    the attention maps ``exp(s − lse)`` to ``s`` instead, with ``lse [B, H]`` the forward's."""
    b = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    start = group * tokens
    end = tl.minimum(start + tokens, T)
    t = start + tl.arange(0, BLOCK_N)
    heads = tl.arange(0, H_PAD)
    mean, rstd = _row_stats(x0_ptr, p_ptr, b, t, end, C, s_x0b, s_pb, s_pn, eps, BLOCK_N, BLOCK_K, ACC)
    gn, kb, _, _, _, _ = _scores(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, kt_ptr, b, t, end, heads,
                                 mean, rstd, C, H, s_x0b, s_pb, s_pn, s_ktb, s_kth, s_ktb, s_kth,
                                 BLOCK_N, BLOCK_K, H_PAD, ACC, DOT, ON_N, False)
    s = gn + kb[:, None]
    valid = (heads < H)[:, None] & (t < end)[None, :]
    s_offs = (b * H + heads[:, None]) * T + t[None, :]
    if MAPS:
        lse = tl.load(lse_ptr + b * H + heads, mask=heads < H, other=0.0)
        tl.store(s_ptr + s_offs, tl.exp(s - lse[:, None]), mask=valid)
    else:
        tl.store(s_ptr + s_offs, s, mask=valid)
        tl.store(mean_ptr + b * T + t, mean, mask=t < end)
        tl.store(rstd_ptr + b * T + t, rstd, mask=t < end)
        s = tl.where(valid, s, float("-inf"))
        m = tl.max(s, 1)
        l = tl.sum(tl.exp(s - tl.where(heads < H, m, 0.0)[:, None]), 1)
        row = (b * tl.num_programs(1) + group) * H + heads
        tl.store(m_ptr + row, m, mask=heads < H)
        tl.store(l_ptr + row, l, mask=heads < H)


@triton.jit(do_not_specialize=["T", "chunk", "G"])
def _pool_fwd_kernel(x0_ptr, p_ptr, gamma_ptr, beta_ptr, s_ptr, mean_ptr, rstd_ptr, m_ptr, l_ptr,
                     out_ptr, lse_ptr, T, C, H, G, chunk, s_x0b, s_pb, s_pn,
                     H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_G: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                     FINAL: tl.constexpr):
    """Grid ``(B, channel tiles, splits)``: ``Σ_j a_hj n_j`` over this split's tokens, for this
    channel tile, with ``a = exp(s − lse)``. ``FINAL`` (one split): writes ``z = γ ⊙ Σ + β`` to
    ``out [B, H, C]``; otherwise the split's sum to ``out [B, S, H, C]``. The first channel tile's
    first split writes ``lse``."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    heads = tl.arange(0, H_PAD)
    lse = _log_sum_exp(m_ptr, l_ptr, b, heads, H, G, BLOCK_G, H_PAD, ACC)
    acc = tl.zeros([H_PAD, BLOCK_C], ACC)
    start = split * chunk
    end = tl.minimum(start + chunk, T)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        mean = tl.load(mean_ptr + b * T + t, mask=t < end, other=0.0)
        rstd = tl.load(rstd_ptr + b * T + t, mask=t < end, other=0.0)
        _, n, _ = _normalized(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn, mean, rstd, ACC)
        valid = (heads < H)[:, None] & (t < end)[None, :]
        s = tl.load(s_ptr + (b * H + heads[:, None]) * T + t[None, :], mask=valid, other=0.0)
        a = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        acc += tl.dot(a.to(DOT), n.to(DOT), input_precision="ieee")
    hc_mask = (heads < H)[:, None] & (cols < C)[None, :]
    if FINAL:
        gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0)
        beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)
        tl.store(out_ptr + (b * H + heads[:, None]) * C + cols[None, :],
                 gamma[None, :] * acc + beta[None, :], mask=hc_mask)
    else:
        row = b * tl.num_programs(2) + split
        tl.store(out_ptr + (row * H + heads[:, None]) * C + cols[None, :], acc, mask=hc_mask)
    if (tl.program_id(1) == 0) & (split == 0):
        tl.store(lse_ptr + b * H + heads, lse, mask=heads < H)


@triton.jit
def _pool_combine_kernel(part_ptr, gamma_ptr, beta_ptr, z_ptr, S, H, C,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(B·H, channel tiles)``: ``z = γ ⊙ Σ_s part_s + β`` over the ``S`` splits of one
    sample and head (``part [B, S, H, C]``)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    splits = tl.arange(0, BLOCK_S)
    mask = (splits < S)[:, None] & (cols < C)[None, :]
    part = tl.load(part_ptr + ((b * S + splits[:, None]) * H + h) * C + cols[None, :], mask=mask,
                   other=0.0)
    gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)
    tl.store(z_ptr + bh * C + cols, gamma * tl.sum(part, 0) + beta, mask=cols < C)


# ---- backward -----------------------------------------------------------------------------------

@triton.jit
def _dxhat(a_op, ds_op, dz_ptr, kt_ptr, b, heads, cols, H, C, s_dzb, s_dzh, s_ktb, s_kth,
           DOT: tl.constexpr):
    """``dx̂ = Σ_h a_h dz_h + ds_h kt_h`` at channels ``cols``: ``[BLOCK_N, BLOCK_K]``."""
    dz, _ = _head_tile(dz_ptr, s_dzb, s_dzh, b, heads, cols, H, C)
    kt, _ = _head_tile(kt_ptr, s_ktb, s_kth, b, heads, cols, H, C)
    return (tl.dot(tl.trans(a_op), dz.to(DOT), input_precision="ieee")
            + tl.dot(tl.trans(ds_op), kt.to(DOT), input_precision="ieee"))


@triton.jit(do_not_specialize=["T", "tokens"])
def _token_bwd_kernel(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, z_ptr, dz_ptr, lse_ptr,
                      dx0_ptr, dp_ptr, a_ptr, ds_ptr, mean_ptr, rstd_ptr, T, C, H, tokens,
                      s_x0b, s_pb, s_pn, s_ktb, s_kth, s_dzb, s_dzh, s_dx0b, s_dpb, s_dpn,
                      eps: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                      ON_N: tl.constexpr):
    """Grid ``(B, G)``: ``dx`` of ``tokens`` tokens of one sample, and for the pooling backward
    their ``a`` and ``ds`` (``[B, H, T]``) and LayerNorm statistics (``[B, T]``).

    ``a = exp(s − lse)``, ``ds = a (dz · x̂ − δ)`` with ``δ_h = dz_h · z_h``; ``dn = γ ⊙ dx̂`` with
    ``dx̂ = Σ_h a dz_h + ds kt_h``; ``dx = r (dn − mean(dn) − n mean(dn ⊙ n))``. The two row sums
    come from the scores' sweep, not a sweep of their own: ``Σ_c dn = Σ_h a Σ_c dz_h ⊙ γ + ds
    Σ_c g_h`` and ``Σ_c dn ⊙ n = Σ_h a (dz_h ⊙ γ) · n + ds g_h · n`` (``g = kt ⊙ γ``). The next
    sweep writes ``dx``."""
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * tokens
    end = tl.minimum(start + tokens, T)
    t = start + tl.arange(0, BLOCK_N)
    heads = tl.arange(0, H_PAD)
    mean, rstd = _row_stats(x0_ptr, p_ptr, b, t, end, C, s_x0b, s_pb, s_pn, eps, BLOCK_N, BLOCK_K, ACC)
    gn, kb, gsum, wn, wb, wsum = _scores(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, dz_ptr, b, t,
                                         end, heads, mean, rstd, C, H, s_x0b, s_pb, s_pn, s_ktb,
                                         s_kth, s_dzb, s_dzh, BLOCK_N, BLOCK_K, H_PAD, ACC, DOT,
                                         ON_N, True)
    delta = tl.zeros([H_PAD], ACC)
    for c0 in range(0, C, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        dz, mask = _head_tile(dz_ptr, s_dzb, s_dzh, b, heads, cols, H, C)
        z = tl.load(z_ptr + (b * H + heads[:, None]) * C + cols[None, :], mask=mask, other=0.0)
        delta += tl.sum(dz.to(ACC) * z, 1)
    lse = tl.load(lse_ptr + b * H + heads, mask=heads < H, other=0.0)
    valid = (heads < H)[:, None] & (t < end)[None, :]
    a = tl.where(valid, tl.exp(gn + kb[:, None] - lse[:, None]), 0.0)
    ds = a * (wn + wb[:, None] - delta[:, None])
    a_op, ds_op = a.to(DOT), ds.to(DOT)
    dn_sum = tl.sum(a * wsum[:, None] + ds * gsum[:, None], 0)
    dnn_sum = tl.sum(a * wn + ds * gn, 0)
    for c0 in range(0, C, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        _, n, mask = _normalized(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn, mean, rstd, ACC)
        gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0)
        dn = _dxhat(a_op, ds_op, dz_ptr, kt_ptr, b, heads, cols, H, C, s_dzb, s_dzh, s_ktb, s_kth,
                    DOT) * gamma[None, :]
        dx = (dn - (dn_sum / C)[:, None] - n * (dnn_sum / C)[:, None]) * rstd[:, None]
        dptrs, _ = _token_ptrs(dx0_ptr, dp_ptr, b, t, cols, end, C, s_dx0b, s_dpb, s_dpn)
        tl.store(dptrs, dx.to(dx0_ptr.dtype.element_ty), mask=mask)
    s_offs = (b * H + heads[:, None]) * T + t[None, :]
    tl.store(a_ptr + s_offs, a, mask=valid)
    tl.store(ds_ptr + s_offs, ds, mask=valid)
    tl.store(mean_ptr + b * T + t, mean, mask=t < end)
    tl.store(rstd_ptr + b * T + t, rstd, mask=t < end)


@triton.jit(do_not_specialize=["T", "chunk"])
def _pool_bwd_kernel(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, dz_ptr, a_ptr, ds_ptr, mean_ptr,
                     rstd_ptr, dkt_ptr, dgamma_ptr, dbeta_ptr, T, C, H, chunk, s_x0b, s_pb, s_pn,
                     s_ktb, s_kth, s_dzb, s_dzh,
                     H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr, DOT: tl.constexpr):
    """Grid ``(B, channel tiles, splits)``: this split's share of the parameter gradients at this
    channel tile. With ``P_h = Σ_j a_hj n_j``, ``Q_h = Σ_j ds_hj n_j`` (design.md §2):
    ``dkt_h = γ ⊙ Q_h + β Σ_j ds_hj``, ``dγ = Σ_h dz_h ⊙ P_h + kt_h ⊙ Q_h``,
    ``dβ = Σ_h dz_h Σ_j a_hj + kt_h Σ_j ds_hj``; written as ``[B, S, H, C]`` and ``[B·S, C]``
    partials that the caller sums."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    heads = tl.arange(0, H_PAD)
    P = tl.zeros([H_PAD, BLOCK_C], ACC)
    Q = tl.zeros([H_PAD, BLOCK_C], ACC)
    a_sum = tl.zeros([H_PAD], ACC)
    ds_sum = tl.zeros([H_PAD], ACC)
    start = split * chunk
    end = tl.minimum(start + chunk, T)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        mean = tl.load(mean_ptr + b * T + t, mask=t < end, other=0.0)
        rstd = tl.load(rstd_ptr + b * T + t, mask=t < end, other=0.0)
        _, n, _ = _normalized(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn, mean, rstd, ACC)
        valid = (heads < H)[:, None] & (t < end)[None, :]
        offs = (b * H + heads[:, None]) * T + t[None, :]
        a = tl.load(a_ptr + offs, mask=valid, other=0.0)
        ds = tl.load(ds_ptr + offs, mask=valid, other=0.0)
        n_op = n.to(DOT)
        P += tl.dot(a.to(DOT), n_op, input_precision="ieee")
        Q += tl.dot(ds.to(DOT), n_op, input_precision="ieee")
        a_sum += tl.sum(a, 1)
        ds_sum += tl.sum(ds, 1)
    gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)
    dz, hc_mask = _head_tile(dz_ptr, s_dzb, s_dzh, b, heads, cols, H, C)
    kt, _ = _head_tile(kt_ptr, s_ktb, s_kth, b, heads, cols, H, C)
    dz, kt = dz.to(ACC), kt.to(ACC)
    row = b * tl.num_programs(2) + split
    tl.store(dkt_ptr + (row * H + heads[:, None]) * C + cols[None, :],
             gamma[None, :] * Q + beta[None, :] * ds_sum[:, None], mask=hc_mask)
    tl.store(dgamma_ptr + row * C + cols, tl.sum(dz * P + kt * Q, 0), mask=cols < C)
    tl.store(dbeta_ptr + row * C + cols, tl.sum(dz * a_sum[:, None] + kt * ds_sum[:, None], 0),
             mask=cols < C)


# ---- launchers ----------------------------------------------------------------------------------

def launch_scores(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor, eps: float,
                  dot_dtype: Optional[torch.dtype], p: Plan, lse: Optional[Tensor] = None,
                  launch=direct):
    """The scores kernel (``lse`` given: the maps kernel). Returns ``(s, mean, rstd, m, l)``
    (``s`` holds the maps where ``lse`` was given; the other four are then ``None``)."""
    B, N, C = patches.shape
    H, T = kt.shape[1], N + 1
    acc = acc_dtype(x0.dtype)
    ACC, DOT, ON_N = _tl_dtypes(x0.dtype, dot_dtype)
    G = p.token_groups(T)
    s = x0.new_empty((B, H, T), dtype=acc)
    maps = lse is not None
    mean = rstd = m = l = None
    if not maps:
        mean, rstd = x0.new_empty((B, T), dtype=acc), x0.new_empty((B, T), dtype=acc)
        m, l = x0.new_empty((B, G, H), dtype=acc), x0.new_empty((B, G, H), dtype=acc)
    if B:
        launch(_scores_kernel)[(B, G)](
            x0, patches, kt, gamma, beta, s, mean, rstd, m, l, lse, T, C, H, p.tokens,
            x0.stride(0), patches.stride(0), patches.stride(1), kt.stride(0), kt.stride(1), eps,
            H_PAD=p.h_pad, BLOCK_N=p.block_n, BLOCK_K=p.block_k, ACC=ACC, DOT=DOT, ON_N=ON_N,
            MAPS=maps, num_warps=p.token_warps, num_stages=p.token_stages)
    return s, mean, rstd, m, l


def _prepare(x0: Tensor, patches: Tensor, kt: Tensor, *params: Tensor):
    """The token tensors as the kernels index them (:func:`token_rows`; copies only where
    needed) and the per-channel and per-head parameters contiguous in the accumulation dtype."""
    acc = acc_dtype(x0.dtype)
    return (unit_last_stride(x0), token_rows(patches), unit_last_stride(kt),
            *(contiguous_as(t, acc) for t in params))


def attn_pool_fwd(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                  eps: float, dot_dtype: Optional[torch.dtype] = None,
                  splits: Optional[int] = None, launch=direct) -> Tuple[Tensor, Tensor]:
    """``(z [B, H, C], lse [B, H])`` in the accumulation dtype; see ``torch_backend.attn_pool_fwd``.

    ``dot_dtype`` (fp16/bf16) lets fp32 tokens meet the tensor cores (see :func:`_tl_dtypes`);
    ``splits`` forces the number of token splits of the pooling kernel (default: :func:`plan`);
    ``launch`` makes each kernel launchable (``_launch.traced`` inside a ``triton_op``).
    """
    B, N, C = patches.shape
    H, T = kt.shape[1], N + 1
    acc = acc_dtype(x0.dtype)
    ACC, DOT, _ = _tl_dtypes(x0.dtype, dot_dtype)
    x0, patches, kt, gamma, beta = _prepare(x0, patches, kt, gamma, beta)
    p = _plan_for(x0, patches, kt, splits, dot_dtype)
    s, mean, rstd, m, l = launch_scores(x0, patches, kt, gamma, beta, eps, dot_dtype, p, launch=launch)
    z = x0.new_empty((B, H, C), dtype=acc)
    lse = x0.new_empty((B, H), dtype=acc)
    if B == 0:
        return z, lse
    G, tiles = p.token_groups(T), cdiv(C, p.block_c)
    out = z if p.splits == 1 else x0.new_empty((B, p.splits, H, C), dtype=acc)
    launch(_pool_fwd_kernel)[(B, tiles, p.splits)](
        x0, patches, gamma, beta, s, mean, rstd, m, l, out, lse, T, C, H, G, p.chunk,
        x0.stride(0), patches.stride(0), patches.stride(1),
        H_PAD=p.h_pad, BLOCK_N=p.block_n, BLOCK_C=p.block_c, BLOCK_G=min(64, next_power_of_2(G)),
        ACC=ACC, DOT=DOT, FINAL=p.splits == 1, num_warps=p.warps, num_stages=NUM_STAGES)
    if p.splits > 1:
        launch(_pool_combine_kernel)[(B * H, tiles)](
            out, gamma, beta, z, p.splits, H, C, BLOCK_S=next_power_of_2(p.splits),
            BLOCK_C=p.block_c, num_warps=4, num_stages=NUM_STAGES)
    return z, lse


def attn_pool_bwd(dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                  beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                  dot_dtype: Optional[torch.dtype] = None, splits: Optional[int] = None,
                  launch=direct) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx0, dpatches, dkt, dgamma, dbeta)``; see ``torch_backend.attn_pool_bwd``. ``dot_dtype``
    must be the forward's, so that the scores recomputed here are the forward's."""
    B, N, C = patches.shape
    H, T = kt.shape[1], N + 1
    acc = acc_dtype(x0.dtype)
    ACC, DOT, ON_N = _tl_dtypes(x0.dtype, dot_dtype)
    x0, patches, kt, gamma, beta, z, lse = _prepare(x0, patches, kt, gamma, beta, z, lse)
    dz = unit_last_stride(dz)
    p = _plan_for(x0, patches, kt, splits, dot_dtype)
    dx0 = torch.empty_like(x0, memory_format=torch.contiguous_format)
    dpatches = patches.new_empty((B, N, C))
    if B == 0:
        return dx0, dpatches, x0.new_empty((0, H, C), dtype=acc), *x0.new_zeros((2, C), dtype=acc)
    a, ds = x0.new_empty((B, H, T), dtype=acc), x0.new_empty((B, H, T), dtype=acc)
    mean, rstd = x0.new_empty((B, T), dtype=acc), x0.new_empty((B, T), dtype=acc)
    launch(_token_bwd_kernel)[(B, p.token_groups(T))](
        x0, patches, kt, gamma, beta, z, dz, lse, dx0, dpatches, a, ds, mean, rstd, T, C, H, p.tokens,
        x0.stride(0), patches.stride(0), patches.stride(1), kt.stride(0), kt.stride(1),
        dz.stride(0), dz.stride(1), dx0.stride(0), dpatches.stride(0), dpatches.stride(1), eps,
        H_PAD=p.h_pad, BLOCK_N=p.block_n, BLOCK_K=p.block_k, ACC=ACC, DOT=DOT, ON_N=ON_N,
        num_warps=p.token_bwd_warps, num_stages=p.token_stages)
    dkt = x0.new_empty((B, p.splits, H, C), dtype=acc)
    dgamma, dbeta = (x0.new_empty((B * p.splits, C), dtype=acc) for _ in range(2))
    launch(_pool_bwd_kernel)[(B, cdiv(C, p.block_c), p.splits)](
        x0, patches, kt, gamma, beta, dz, a, ds, mean, rstd, dkt, dgamma, dbeta, T, C, H, p.chunk,
        x0.stride(0), patches.stride(0), patches.stride(1), kt.stride(0), kt.stride(1),
        dz.stride(0), dz.stride(1),
        H_PAD=p.h_pad, BLOCK_N=p.block_n, BLOCK_C=p.block_c, ACC=ACC, DOT=DOT,
        num_warps=p.warps, num_stages=p.pool_bwd_stages)
    return (dx0, dpatches, dkt.view(B, H, C) if p.splits == 1 else dkt.sum(dim=1),
            dgamma.sum(dim=0), dbeta.sum(dim=0))
