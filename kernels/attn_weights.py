"""The CLS attention maps of the single-query cross-attention: ``a_hj = exp(s_hj − lse_h)``.

The forward token pass (:mod:`.attn_pool`) already computes the per-head log-sum-exp of the
scores; the maps are recomputed from it in a second pass over the tokens, run only when they are
asked for. Each program takes one sample and ``BLOCK_N`` tokens: it loads them once (the CLS
token and the patch view through their own pointers), computes their LayerNorm statistics and
all heads' scores with the token pass's own helpers, so the scores are the forward's, and writes
``a [B, H, N + 1]``. No accumulation across tokens: programs are independent.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import acc_dtype, cdiv, contiguous_as, unit_last_stride
from .attn_pool import _blocks, _head_params, _normalize, _scores, _tl_dtypes, _token_ptrs


@triton.jit(do_not_specialize=["T"])
def _attn_weights_kernel(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, lse_ptr, a_ptr,
                         T, C, H, s_x0b, s_pb, s_pn, s_ktb, s_kth, eps: tl.constexpr,
                         H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                         ACC: tl.constexpr, DOT: tl.constexpr, SCORES_ON_N: tl.constexpr):
    """Grid ``(B, cdiv(T, BLOCK_N))``: ``a[b, h, t] = exp(s[b, h, t] − lse[b, h])`` for the
    tokens ``t`` of this program (``a`` contiguous ``[B, H, T]``, ``lse`` ``[B, H]``)."""
    b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, H_PAD)
    cols = tl.arange(0, BLOCK_C)
    kt, gamma, beta, g, gsum, kb, hc_mask = _head_params(kt_ptr, s_ktb, s_kth, gamma_ptr, beta_ptr,
                                                         b, heads, cols, H, C, ACC, DOT)
    lse = tl.load(lse_ptr + b * H + heads, mask=heads < H, other=0.0).to(ACC)
    t = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs, mask = _token_ptrs(x0_ptr, p_ptr, b, t, cols, T, C, s_x0b, s_pb, s_pn)
    x = tl.load(ptrs, mask=mask, other=0.0)
    mean, rstd, n = _normalize(x.to(ACC), mask, C, eps)
    s = _scores(g, gsum, kb, x, n, mean, rstd, DOT, SCORES_ON_N)
    a = tl.exp(s - lse[:, None])
    tl.store(a_ptr + (b * H + heads[:, None]) * T + t[None, :], a,
             mask=(heads < H)[:, None] & (t < T)[None, :])


def attn_weights(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                 lse: Tensor, eps: float, dot_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``a [B, H, N + 1]`` in the accumulation dtype; see ``torch_backend.attn_weights``.

    ``lse`` and ``dot_dtype`` must be those of the forward token pass that the maps belong to,
    so that the maps are that pass's softmax (each row sums to 1 up to rounding).
    """
    B, N, C = patches.shape
    H = kt.shape[1]
    acc = acc_dtype(x0.dtype)
    ACC, DOT, ON_N = _tl_dtypes(x0.dtype, dot_dtype)
    x0, patches, kt = unit_last_stride(x0), unit_last_stride(patches), unit_last_stride(kt)
    gamma, beta, lse = (contiguous_as(t, acc) for t in (gamma, beta, lse))
    block_c, h_pad, block_n, num_warps = _blocks(C, H, backward=False)
    a = x0.new_empty((B, H, N + 1), dtype=acc)
    if B == 0:
        return a
    _attn_weights_kernel[(B, cdiv(N + 1, block_n))](
        x0, patches, kt, gamma, beta, lse, a, N + 1, C, H,
        x0.stride(0), patches.stride(0), patches.stride(1), kt.stride(0), kt.stride(1), eps,
        H_PAD=h_pad, BLOCK_N=block_n, BLOCK_C=block_c, ACC=ACC, DOT=DOT, SCORES_ON_N=ON_N,
        num_warps=num_warps)
    return a
