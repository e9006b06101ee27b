"""The naive reference: CrossViT's math exactly as timm writes it (K and V formed, ``torch.cat``).

Tests compare the fused ops against these functions in float64; ``crossvit-fast check`` and
``bench`` compare the fused model against the same model run under :func:`naive_math`, where
every drop-in module takes this path instead of a fused op. The modules also take it in training
with dropout inside the attention, which the fused ops do not implement.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_naive = False


def naive_enabled() -> bool:
    """True inside :func:`naive_math`, and under ``torch.func``'s transforms (``vmap``,
    ``grad``, ``jacrev``, ...: per-sample gradients), which the fused ops' autograd Functions and
    kernels do not support, so that timm's math runs there as in timm."""
    return _naive or _functorch_transform_active()


def _functorch_transform_active() -> bool:
    # not read while dynamo traces (it would not trace the query; torch.compile runs no transform)
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None


@contextlib.contextmanager
def naive_math(enabled: bool = True) -> Iterator[None]:
    """Context manager: drop-in modules run timm's naive math instead of the fused ops."""
    global _naive
    previous, _naive = _naive, enabled
    try:
        yield
    finally:
        _naive = previous


def cross_attention(x: Tensor, wq: Callable[[Tensor], Tensor], wk: Callable[[Tensor], Tensor],
                    wv: Callable[[Tensor], Tensor], proj: Callable[[Tensor], Tensor],
                    num_heads: int, scale: float,
                    attn_drop: Callable[[Tensor], Tensor] = lambda a: a) -> Tensor:
    """timm's ``CrossAttention`` on normalized tokens ``x [B, N, C]``: token 0 queries all tokens.

    ``wq``, ``wk``, ``wv``, ``proj`` are the four projections as callables: timm's ``Linear``
    modules themselves (so their hooks and any wrapper around them run, as in timm), or
    :func:`linear` of given weights."""
    B, N, C = x.shape
    D = C // num_heads
    q = wq(x[:, 0:1]).reshape(B, 1, num_heads, D).permute(0, 2, 1, 3)
    k = wk(x).reshape(B, N, num_heads, D).permute(0, 2, 1, 3)
    v = wv(x).reshape(B, N, num_heads, D).permute(0, 2, 1, 3)
    attn = attn_drop(((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1))
    out = (attn @ v).transpose(1, 2).reshape(B, 1, C)
    return proj(out)


def linear(weight: Tensor, bias: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    """``F.linear`` with fixed ``weight`` and ``bias``, as a callable."""
    return lambda t: F.linear(t, weight, bias)


def cls_cross_attention(cls: Tensor, patches: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                        wq_weight: Tensor, wq_bias: Optional[Tensor], wk_weight: Tensor,
                        wk_bias: Optional[Tensor], wv_weight: Tensor, wv_bias: Optional[Tensor],
                        proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int,
                        scale: float, eps: float = 1e-6, add_residual: bool = True) -> Tensor:
    """timm's ``CrossAttentionBlock`` (no dropout): ``cls + attn(norm1([cls ‖ patches]))``.

    Same arguments as :func:`crossvit_fast.ops.cls_cross_attention`; ``cls`` is ``[B, 1, C]``.
    """
    x = torch.cat([cls, patches], dim=1)
    x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    out = cross_attention(x, linear(wq_weight, wq_bias), linear(wk_weight, wk_bias),
                          linear(wv_weight, wv_bias), linear(proj_weight, proj_bias), num_heads, scale)
    return cls + out if add_residual else out


def cls_projection(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                   eps: float = 1e-6) -> Tensor:
    """timm's ``Sequential(LayerNorm, GELU, Linear)`` CLS projection."""
    return F.linear(F.gelu(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)), weight, bias)


def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                   eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(LayerNorm(x + residual), x + residual)`` with plain torch ops."""
    h = x if residual is None else x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h
