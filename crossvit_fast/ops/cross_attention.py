"""CrossViT's CLS cross-attention as one autograd-aware custom op (design.md §2).

The CLS token attends, as the single query, over ``[itself ‖ the other branch's patches]``.
Because there is one query, K and V are never formed: the query is pushed through ``Wk``
(``kt_h = scale · Wk_hᵀ q_h``), the token pass of the backend returns the per-head softmax-weighted
mean of the LayerNorm-ed tokens (``z``), and ``Wv``/``proj`` act on that mean. The four small
per-sample products (q, kt, o, y) are batched matmuls shared by every backend; only the token pass
(``attn_pool_fwd``/``attn_pool_bwd``) is backend-specific.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.torch_backend import layer_norm_input_grad, normalize
from ._common import (acc_dtype, backend_impl, cast_like, check_float_tensor, check_same_device,
                      check_vector, requested_backend, without_autocast)

OP = "cls_cross_attention"


def _heads(weight: Tensor, num_heads: int, acc: torch.dtype) -> Tensor:
    """A ``[C, C]`` projection weight viewed per head: ``[H, D, C]``."""
    c_out, c_in = weight.shape
    return weight.to(acc).view(num_heads, c_out // num_heads, c_in)


def _query_side(x0: Tensor, norm_weight: Tensor, norm_bias: Tensor, wq_weight: Tensor,
                wq_bias: Optional[Tensor], wk_weight: Tensor, num_heads: int, scale: float,
                eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x̂0, q [B, H, D], kt [B, H, C])`` in the accumulation dtype of ``x0``."""
    acc = acc_dtype(x0)
    B, C = x0.shape
    xhat0 = F.layer_norm(x0.to(acc), (C,), norm_weight.to(acc), norm_bias.to(acc), eps)
    q = F.linear(xhat0, wq_weight.to(acc), None if wq_bias is None else wq_bias.to(acc))
    q = q.view(B, num_heads, C // num_heads)
    kt = scale * torch.einsum("bhd,hdc->bhc", q, _heads(wk_weight, num_heads, acc))
    return xhat0, q, kt


@torch.library.custom_op("crossvit_fast::cls_cross_attn", mutates_args=())
@without_autocast
def _cls_cross_attn(cls: Tensor, patches: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                    wq_weight: Tensor, wq_bias: Optional[Tensor], wk_weight: Tensor,
                    wk_bias: Optional[Tensor], wv_weight: Tensor, wv_bias: Optional[Tensor],
                    proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int, scale: float,
                    eps: float, add_residual: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    # wk_bias shifts every score of a head by the same amount: softmax ignores it (design.md §2).
    impl = backend_impl(backend, cls.device)
    acc = acc_dtype(cls)
    B, C = cls.shape
    _, _, kt = _query_side(cls, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight,
                           num_heads, scale, eps)
    z, lse = impl.attn_pool_fwd(cls, patches, kt, norm_weight, norm_bias, eps)
    z = z.to(acc)
    o = torch.einsum("bhc,hdc->bhd", z, _heads(wv_weight, num_heads, acc)).reshape(B, C)
    if wv_bias is not None:
        o = o + wv_bias.to(acc)
    y = F.linear(o, proj_weight.to(acc), None if proj_bias is None else proj_bias.to(acc))
    if add_residual:
        y = y + cls.to(acc)
    return y.to(cls.dtype), z, lse.to(acc)


@_cls_cross_attn.register_fake
def _(cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wk_bias, wv_weight,
      wv_bias, proj_weight, proj_bias, num_heads, scale, eps, add_residual, backend):
    B, C = cls.shape
    acc = acc_dtype(cls)
    return (torch.empty_like(cls), cls.new_empty((B, num_heads, C), dtype=acc),
            cls.new_empty((B, num_heads), dtype=acc))


@torch.library.custom_op("crossvit_fast::cls_cross_attn_backward", mutates_args=())
@without_autocast
def _cls_cross_attn_backward(dy: Tensor, cls: Tensor, patches: Tensor, norm_weight: Tensor,
                             norm_bias: Tensor, wq_weight: Tensor, wq_bias: Optional[Tensor],
                             wk_weight: Tensor, wv_weight: Tensor, wv_bias: Optional[Tensor],
                             proj_weight: Tensor, z: Tensor,
                             lse: Tensor, num_heads: int, scale: float, eps: float,
                             add_residual: bool, backend: str) -> List[Tensor]:
    """Gradients ``[dcls, dpatches, dnorm_w, dnorm_b, dwq_w, dwq_b, dwk_w, dwv_w, dwv_b, dproj_w,
    dproj_b]`` (accumulation dtype, except dcls/dpatches in the activation dtype)."""
    impl = backend_impl(backend, cls.device)
    acc = acc_dtype(cls)
    B, C = cls.shape
    D = C // num_heads
    dy = dy.to(acc)
    xhat0, q, kt = _query_side(cls, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight,
                               num_heads, scale, eps)
    wv_h = _heads(wv_weight, num_heads, acc)
    # y = proj(o) (+ cls) with o = Wv z + bv
    o = torch.einsum("bhc,hdc->bhd", z, wv_h).reshape(B, C)
    if wv_bias is not None:
        o = o + wv_bias.to(acc)
    d_proj_w = dy.t() @ o
    d_proj_b = dy.sum(0)
    d_o = dy @ proj_weight.to(acc)
    d_wv_b = d_o.sum(0)
    d_o = d_o.view(B, num_heads, D)
    dz = torch.einsum("bhd,hdc->bhc", d_o, wv_h)
    d_wv = torch.einsum("bhd,bhc->hdc", d_o, z).reshape(C, C)
    d_x0, d_patches, d_kt, d_gamma, d_beta = impl.attn_pool_bwd(
        dz, cls, patches, kt, norm_weight, norm_bias, z, lse, eps)
    # kt = scale · Wkᵀ q  and  q = Wq x̂0 + bq
    d_kt = d_kt.to(acc)
    d_q = scale * torch.einsum("bhc,hdc->bhd", d_kt, _heads(wk_weight, num_heads, acc)).reshape(B, C)
    d_wk = scale * torch.einsum("bhd,bhc->hdc", q, d_kt).reshape(C, C)
    d_wq = d_q.t() @ xhat0
    d_wq_b = d_q.sum(0)
    # the CLS token's own query path: x̂0 = LN(x0) feeds q
    d_xhat0 = d_q @ wq_weight.to(acc)
    n0, _, rstd0 = normalize(cls, eps)
    d_x0 = d_x0.to(acc) + layer_norm_input_grad(d_xhat0 * norm_weight.to(acc), n0, rstd0)
    if add_residual:
        d_x0 = d_x0 + dy
    d_gamma = d_gamma.to(acc) + (d_xhat0 * n0).sum(0)
    d_beta = d_beta.to(acc) + d_xhat0.sum(0)
    return [d_x0.to(cls.dtype), d_patches, d_gamma, d_beta, d_wq, d_wq_b, d_wk, d_wv, d_wv_b,
            d_proj_w, d_proj_b]


@_cls_cross_attn_backward.register_fake
def _(dy, cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wv_weight, wv_bias,
      proj_weight, z, lse, num_heads, scale, eps, add_residual, backend):
    acc = acc_dtype(cls)
    C = cls.shape[1]
    vec = lambda: cls.new_empty((C,), dtype=acc)  # noqa: E731
    mat = lambda: cls.new_empty((C, C), dtype=acc)  # noqa: E731
    return [torch.empty_like(cls), torch.empty(patches.shape, dtype=patches.dtype, device=patches.device),
            vec(), vec(), mat(), vec(), mat(), mat(), vec(), mat(), vec()]


def _setup_context(ctx, inputs, output):
    (cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wk_bias, wv_weight,
     wv_bias, proj_weight, proj_bias, num_heads, scale, eps, add_residual, backend) = inputs
    _, z, lse = output
    ctx.mark_non_differentiable(z, lse)
    ctx.save_for_backward(cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight,
                          wk_bias, wv_weight, wv_bias, proj_weight, proj_bias, z, lse)
    ctx.config = (num_heads, scale, eps, add_residual, backend)


def _backward(ctx, dy, _dz, _dlse):
    (cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wk_bias, wv_weight,
     wv_bias, proj_weight, proj_bias, z, lse) = ctx.saved_tensors
    (d_cls, d_patches, d_nw, d_nb, d_wq, d_wq_b, d_wk, d_wv, d_wv_b, d_pw, d_pb) = \
        _cls_cross_attn_backward(dy, cls, patches, norm_weight, norm_bias, wq_weight, wq_bias,
                                 wk_weight, wv_weight, wv_bias, proj_weight, z, lse, *ctx.config)
    # wk's bias gets an exact zero gradient (it cancels in the softmax), not None: optimizers and
    # DDP then treat it like every other parameter.
    d_wk_b = None if wk_bias is None else torch.zeros_like(wk_bias)
    return (d_cls, d_patches, cast_like(d_nw, norm_weight), cast_like(d_nb, norm_bias),
            cast_like(d_wq, wq_weight), cast_like(d_wq_b, wq_bias), cast_like(d_wk, wk_weight),
            d_wk_b, cast_like(d_wv, wv_weight), cast_like(d_wv_b, wv_bias),
            cast_like(d_pw, proj_weight), cast_like(d_pb, proj_bias), None, None, None, None, None)


_cls_cross_attn.register_autograd(_backward, setup_context=_setup_context)


def cls_cross_attention(cls: Tensor, patches: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                        wq_weight: Tensor, wq_bias: Optional[Tensor], wk_weight: Tensor,
                        wk_bias: Optional[Tensor], wv_weight: Tensor, wv_bias: Optional[Tensor],
                        proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int,
                        scale: float, eps: float = 1e-6, add_residual: bool = True,
                        backend: Optional[str] = None) -> Tensor:
    """``cls + proj(attention of LN(cls) over LN([cls ‖ patches]))`` without forming K or V.

    Args:
        cls: the (projected) CLS token, ``[B, 1, C]`` or ``[B, C]``.
        patches: the other branch's patch tokens ``[B, N, C]``; a strided view such as
            ``tokens[:, 1:]`` is read in place.
        norm_weight, norm_bias: ``norm1`` of timm's ``CrossAttentionBlock`` (``[C]``).
        wq_*, wk_*, wv_*, proj_*: the ``[C, C]`` weights and ``[C]`` biases of ``attn``.
        num_heads, scale: as in timm's ``CrossAttention`` (``scale = head_dim ** -0.5``).
        add_residual: add ``cls`` to the result (timm's block does; off for stochastic depth).
        backend: ``auto``/``triton``/``cuda``/``torch`` for this call; None uses the current choice.

    Returns:
        the updated CLS token, shaped like ``cls``.
    """
    for name, t in (("cls", cls), ("patches", patches), ("norm_weight", norm_weight),
                    ("wq_weight", wq_weight), ("wk_weight", wk_weight), ("wv_weight", wv_weight),
                    ("proj_weight", proj_weight)):
        check_float_tensor(name, t, OP)
    if cls.dim() not in (2, 3) or (cls.dim() == 3 and cls.shape[1] != 1):
        raise ValueError(f"{OP}: cls must be [B, 1, C] or [B, C], got shape {tuple(cls.shape)}")
    x0 = cls.reshape(cls.shape[0], cls.shape[-1])
    B, C = x0.shape
    if patches.dim() != 3 or patches.shape[0] != B or patches.shape[2] != C:
        raise ValueError(f"{OP}: patches must be [B, N, C] = [{B}, N, {C}] to match cls, "
                         f"got shape {tuple(patches.shape)}")
    if patches.dtype != x0.dtype:
        raise TypeError(f"{OP}: patches dtype {patches.dtype} must match cls dtype {x0.dtype}")
    if not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads:
        raise ValueError(f"{OP}: num_heads must be a positive divisor of C={C}, got {num_heads}")
    for name, w in (("wq_weight", wq_weight), ("wk_weight", wk_weight), ("wv_weight", wv_weight),
                    ("proj_weight", proj_weight)):
        if tuple(w.shape) != (C, C):
            raise ValueError(f"{OP}: {name} must be [{C}, {C}], got {tuple(w.shape)}")
    for name, v in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("wq_bias", wq_bias),
                    ("wk_bias", wk_bias), ("wv_bias", wv_bias), ("proj_bias", proj_bias)):
        check_vector(OP, name, v, C)
    check_same_device(OP, cls=cls, patches=patches, norm_weight=norm_weight, norm_bias=norm_bias,
                      wq_weight=wq_weight, wq_bias=wq_bias, wk_weight=wk_weight, wk_bias=wk_bias,
                      wv_weight=wv_weight, wv_bias=wv_bias, proj_weight=proj_weight,
                      proj_bias=proj_bias)
    if patches.stride(-1) != 1:
        patches = patches.contiguous()
    y, _, _ = _cls_cross_attn(x0, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight,
                              wk_bias, wv_weight, wv_bias, proj_weight, proj_bias, num_heads,
                              float(scale), float(eps), bool(add_residual), requested_backend(backend))
    return y.view(cls.shape)
