"""CrossViT's CLS cross-attention as one autograd-aware custom op (design.md §2).

The CLS token attends, as the single query, over ``[itself ‖ the other branch's patches]``.
Because there is one query, K and V are never formed: the query is pushed through ``Wk``
(``kt_h = scale · Wk_hᵀ q_h``), the token pass of the backend returns the per-head softmax-weighted
mean of the LayerNorm-ed tokens (``z``), and ``Wv``/``proj`` act on that mean. The four small
per-sample products (q, kt, o, y) are batched matmuls shared by every backend; only the token pass
(``attn_pool_fwd``/``attn_pool_bwd``) is backend-specific.

Under autocast the small products stay fp32 (autocast is switched off inside), while the token
pass may run its products in the autocast dtype, as timm's K/V projections do there.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.torch_backend import layer_norm_input_grad, normalize
from ._common import (acc_dtype, as_dtype, backend_impl, cast_like, check_float_tensor,
                      check_same_device, check_vector, choose, eager_autograd, requested_backend,
                      without_autocast)

OP = "cls_cross_attention"


def _heads(weight: Tensor, num_heads: int, acc: torch.dtype) -> Tensor:
    """A ``[C, C]`` projection weight viewed per head: ``[H, D, C]``."""
    c_out, c_in = weight.shape
    return as_dtype(weight, acc).view(num_heads, c_out // num_heads, c_in)


def _heads_first(t: Tensor, num_heads: int) -> Tensor:
    """``[B, C]`` rows as per-head blocks, heads first: a ``[H, B, D]`` view for ``bmm``."""
    B, C = t.shape
    return t.view(B, num_heads, C // num_heads).transpose(0, 1)


def _query_side(x0: Tensor, norm_weight: Tensor, norm_bias: Tensor, wq_weight: Tensor,
                wq_bias: Optional[Tensor], wk_weight: Tensor, num_heads: int, scale: float,
                eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x̂0 [B, C], q [H, B, D], kt [B, H, C])`` in the accumulation dtype of ``x0``; ``q`` and
    ``kt`` are transposed views of heads-first products."""
    acc = acc_dtype(x0)
    C = x0.shape[1]
    xhat0 = F.layer_norm(as_dtype(x0, acc), (C,), as_dtype(norm_weight, acc),
                         as_dtype(norm_bias, acc), eps)
    q = F.linear(xhat0, as_dtype(wq_weight, acc), as_dtype(wq_bias, acc))
    q = _heads_first(q, num_heads)
    kt = torch.bmm(q, _heads(wk_weight, num_heads, acc)).mul_(scale)
    return xhat0, q, kt.transpose(0, 1)


def _values(z: Tensor, wv_weight: Tensor, wv_bias: Optional[Tensor], num_heads: int) -> Tensor:
    """``o = Wv z + bv`` per head, as ``[B, C]`` rows (``z``: ``[B, H, C]``)."""
    B, H, C = z.shape
    wv_h = _heads(wv_weight, num_heads, z.dtype).transpose(1, 2)          # [H, C, D]
    z_h = z.transpose(0, 1)                                               # [H, B, C]
    if wv_bias is None:
        o = torch.bmm(z_h, wv_h)
    else:
        o = torch.baddbmm(as_dtype(wv_bias, z.dtype).view(H, 1, C // H), z_h, wv_h)
    return o.transpose(0, 1).reshape(B, C)


@without_autocast
def _forward(cls: Tensor, patches: Tensor, norm_weight: Tensor, norm_bias: Tensor,
             wq_weight: Tensor, wq_bias: Optional[Tensor], wk_weight: Tensor,
             wk_bias: Optional[Tensor], wv_weight: Tensor, wv_bias: Optional[Tensor],
             proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int, scale: float,
             eps: float, add_residual: bool, dot_dtype: Optional[torch.dtype],
             backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    # wk_bias shifts every score of a head by the same amount: softmax ignores it (design.md §2).
    impl = backend_impl(backend, cls.device)
    acc = acc_dtype(cls)
    _, _, kt = _query_side(cls, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight,
                           num_heads, scale, eps)
    z, lse = impl.attn_pool_fwd(cls, patches, kt, norm_weight, norm_bias, eps, dot_dtype)
    z = as_dtype(z, acc)
    o = _values(z, wv_weight, wv_bias, num_heads)
    y = F.linear(o, as_dtype(proj_weight, acc), as_dtype(proj_bias, acc))
    if add_residual:
        y += cls
    return as_dtype(y, cls.dtype), z, as_dtype(lse, acc)


@without_autocast
def _backward_tokens(dy: Tensor, cls: Tensor, patches: Tensor, norm_weight: Tensor,
                     norm_bias: Tensor, wq_weight: Tensor, wq_bias: Optional[Tensor],
                     wk_weight: Tensor, wv_weight: Tensor, wv_bias: Optional[Tensor],
                     proj_weight: Tensor, z: Tensor, lse: Tensor, num_heads: int, scale: float,
                     eps: float, add_residual: bool, dot_dtype: Optional[torch.dtype],
                     backend: str) -> List[Tensor]:
    """Gradients ``[dcls, dpatches, dnorm_w, dnorm_b, dwq_w, dwq_b, dwk_w, dwv_w, dwv_b, dproj_w,
    dproj_b]`` (accumulation dtype, except dcls/dpatches in the activation dtype)."""
    impl = backend_impl(backend, cls.device)
    acc = acc_dtype(cls)
    B, C = cls.shape
    dy = as_dtype(dy, acc)
    xhat0, q, kt = _query_side(cls, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight,
                               num_heads, scale, eps)
    # y = proj(o) (+ cls) with o = Wv z + bv
    o = _values(z, wv_weight, wv_bias, num_heads)
    d_proj_w = dy.t() @ o
    d_proj_b = dy.sum(0)
    d_o = dy @ as_dtype(proj_weight, acc)
    d_wv_b = d_o.sum(0)
    d_o = _heads_first(d_o, num_heads)                                     # [H, B, D]
    dz = torch.bmm(d_o, _heads(wv_weight, num_heads, acc)).transpose(0, 1)  # [B, H, C]
    d_wv = torch.bmm(d_o.transpose(1, 2), z.transpose(0, 1)).view(C, C)
    d_x0, d_patches, d_kt, d_gamma, d_beta = impl.attn_pool_bwd(
        dz, cls, patches, kt, norm_weight, norm_bias, z, lse, eps, dot_dtype)
    # kt = scale · Wkᵀ q  and  q = Wq x̂0 + bq
    d_kt = as_dtype(d_kt, acc).transpose(0, 1)                             # [H, B, C]
    wk_h = _heads(wk_weight, num_heads, acc)
    d_q = torch.bmm(d_kt, wk_h.transpose(1, 2)).mul_(scale).transpose(0, 1).reshape(B, C)
    d_wk = torch.bmm(q.transpose(1, 2), d_kt).mul_(scale).view(C, C)
    d_wq = d_q.t() @ xhat0
    d_wq_b = d_q.sum(0)
    # the CLS token's own query path: x̂0 = LN(x0) feeds q
    d_xhat0 = d_q @ as_dtype(wq_weight, acc)
    n0, _, rstd0 = normalize(cls, eps)
    d_x0 = as_dtype(d_x0, acc) + layer_norm_input_grad(d_xhat0 * as_dtype(norm_weight, acc), n0,
                                                       rstd0)
    if add_residual:
        d_x0 += dy
    d_gamma = as_dtype(d_gamma, acc) + (d_xhat0 * n0).sum(0)
    d_beta = as_dtype(d_beta, acc) + d_xhat0.sum(0)
    return [as_dtype(d_x0, cls.dtype), d_patches, d_gamma, d_beta, d_wq, d_wq_b, d_wk, d_wv, d_wv_b,
            d_proj_w, d_proj_b]


_cls_cross_attn = torch.library.custom_op("crossvit_fast::cls_cross_attn", _forward,
                                          mutates_args=())
_cls_cross_attn_backward = torch.library.custom_op("crossvit_fast::cls_cross_attn_backward",
                                                   _backward_tokens, mutates_args=())


@_cls_cross_attn.register_fake
def _(cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wk_bias, wv_weight,
      wv_bias, proj_weight, proj_bias, num_heads, scale, eps, add_residual, dot_dtype, backend):
    B, C = cls.shape
    acc = acc_dtype(cls)
    # outputs are contiguous whatever the inputs' strides (empty_like would copy a permuted layout)
    return (cls.new_empty((B, C)), cls.new_empty((B, num_heads, C), dtype=acc),
            cls.new_empty((B, num_heads), dtype=acc))


@_cls_cross_attn_backward.register_fake
def _(dy, cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wv_weight, wv_bias,
      proj_weight, z, lse, num_heads, scale, eps, add_residual, dot_dtype, backend):
    acc = acc_dtype(cls)
    C = cls.shape[1]
    vec = lambda: cls.new_empty((C,), dtype=acc)  # noqa: E731
    mat = lambda: cls.new_empty((C, C), dtype=acc)  # noqa: E731
    return [cls.new_empty(cls.shape), patches.new_empty(patches.shape),
            vec(), vec(), mat(), vec(), mat(), mat(), vec(), mat(), vec()]


def _setup_context(ctx, inputs, output):
    (cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wk_bias, wv_weight,
     wv_bias, proj_weight, proj_bias, num_heads, scale, eps, add_residual, dot_dtype,
     backend) = inputs
    _, z, lse = output
    ctx.mark_non_differentiable(z, lse)
    ctx.save_for_backward(cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight,
                          wk_bias, wv_weight, wv_bias, proj_weight, proj_bias, z, lse)
    ctx.config = (num_heads, scale, eps, add_residual, dot_dtype, backend)


def _gradients(backward_tokens):
    """The autograd backward, computing with ``backward_tokens`` (the custom op or its body)."""
    def backward(ctx, dy, _dz, _dlse):
        (cls, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wk_bias, wv_weight,
         wv_bias, proj_weight, proj_bias, z, lse) = ctx.saved_tensors
        (d_cls, d_patches, d_nw, d_nb, d_wq, d_wq_b, d_wk, d_wv, d_wv_b, d_pw, d_pb) = \
            backward_tokens(dy, cls, patches, norm_weight, norm_bias, wq_weight, wq_bias,
                            wk_weight, wv_weight, wv_bias, proj_weight, z, lse, *ctx.config)
        # wk's bias gets an exact zero gradient (it cancels in the softmax), not None: optimizers
        # and DDP then treat it like every other parameter.
        d_wk_b = None if wk_bias is None else torch.zeros_like(wk_bias)
        return (d_cls, d_patches, cast_like(d_nw, norm_weight), cast_like(d_nb, norm_bias),
                cast_like(d_wq, wq_weight), cast_like(d_wq_b, wq_bias), cast_like(d_wk, wk_weight),
                d_wk_b, cast_like(d_wv, wv_weight), cast_like(d_wv_b, wv_bias),
                cast_like(d_pw, proj_weight), cast_like(d_pb, proj_bias), None, None, None, None,
                None, None)
    return backward


_cls_cross_attn.register_autograd(_gradients(_cls_cross_attn_backward), setup_context=_setup_context)
_cls_cross_attn_eager = eager_autograd("ClsCrossAttentionFunction", _forward, _setup_context,
                                       _gradients(_backward_tokens))


def _autocast_dot_dtype(x0: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when fp32 tokens meet the op under autocast, else None.

    timm's cross-attention runs its K/V products in that dtype under autocast, so the token
    pass may too (the Triton backend then uses the tensor cores; statistics, softmax and
    accumulation stay fp32). Outside autocast, fp32 stays fp32.
    """
    device_type = x0.device.type
    if x0.dtype != torch.float32 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


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
    for name, t in (("cls", cls), ("patches", patches), ("wq_weight", wq_weight),
                    ("wk_weight", wk_weight), ("wv_weight", wv_weight), ("proj_weight", proj_weight)):
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
    check_vector(OP, "norm_weight", norm_weight, C)
    check_vector(OP, "norm_bias", norm_bias, C)
    for name, v in (("wq_bias", wq_bias), ("wk_bias", wk_bias), ("wv_bias", wv_bias),
                    ("proj_bias", proj_bias)):
        check_vector(OP, name, v, C, optional=True)
    check_same_device(OP, cls=cls, patches=patches, norm_weight=norm_weight, norm_bias=norm_bias,
                      wq_weight=wq_weight, wq_bias=wq_bias, wk_weight=wk_weight, wk_bias=wk_bias,
                      wv_weight=wv_weight, wv_bias=wv_bias, proj_weight=proj_weight,
                      proj_bias=proj_bias)
    if patches.stride(-1) != 1:
        patches = patches.contiguous()
    y, _, _ = choose(_cls_cross_attn, _cls_cross_attn_eager, _forward)(
        x0, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wk_bias, wv_weight,
        wv_bias, proj_weight, proj_bias, num_heads, float(scale), float(eps), bool(add_residual),
        _autocast_dot_dtype(x0), requested_backend(backend))
    return y.view(cls.shape)
