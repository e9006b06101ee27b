"""CrossViT's CLS cross-attention without K or V (design.md §2).

The CLS token attends, as the single query, over ``[itself ‖ the other branch's patches]``.
Because there is one query, K and V are never formed: the query is pushed through ``Wk``
(``kt_h = scale · Wk_hᵀ q_h``), the token pass of the backend returns the per-head softmax-weighted
mean of the LayerNorm-ed tokens (``z``), and ``Wv``/``proj`` act on that mean.

Only the token pass (``attn_pool_fwd``/``attn_pool_bwd`` of the backend) is a custom op with its
own backward. The four small per-sample products around it (q, kt, o, y) are plain torch code
that autograd differentiates and that ``torch.compile`` traces and fuses. On the Triton backend
the token pass is a ``triton_op`` under the compiler, which decomposes it into its kernel
launches: inductor runs them from its own code; other backends stay one opaque op call.

Under autocast the small products stay fp32 (autocast is switched off around them), while the
token pass may run its products in the autocast dtype, as timm's K/V projections do there.
One exception: ``torch.compile`` traces the backward under the forward's autocast state
(torch's default, ``torch._functorch.config.backward_pass_autocast``), which overrides the
switch-off, so a compiled model computes these products' gradients in the autocast dtype, as
timm's Linears do under autocast (about 1e-2 relative in bf16, against 1e-7 in eager).
"""

import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (acc_dtype, as_dtype, autocast_dtype, backend_impl, cast_like, check_float_tensor,
                      check_same_device, check_vector, choose, compiler_triton_op, eager_autograd,
                      requested_backend, traced_triton, without_autocast)

OP = "cls_cross_attention"


# ---------------------------------------------------------------------------------------------
# The token pass: a custom op with its own backward.
# ---------------------------------------------------------------------------------------------

def _pool_forward_on(impl, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                     eps: float, dot_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    acc = acc_dtype(x0)
    z, lse = impl.attn_pool_fwd(as_dtype(x0, patches.dtype), patches, kt, gamma, beta, eps, dot_dtype)
    return as_dtype(z, acc).contiguous(), as_dtype(lse, acc).contiguous()


@without_autocast
def _pool_forward(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                  wk_bias: Optional[Tensor], eps: float, dot_dtype: Optional[torch.dtype],
                  backend: str) -> Tuple[Tensor, Tensor]:
    """``(z [B, H, C], lse [B, H])`` of the backend's token pass, contiguous, in the
    accumulation dtype.

    ``x0`` (the CLS rows) comes in the accumulation dtype, as the products around the op use
    it, so that its gradients from here and from them add up in fp32; the token pass reads it
    in the patches' dtype (exact: it was cast up from there). ``wk_bias`` is not read: it
    shifts every score of a head by the same amount, which the softmax cancels, and it is
    taken only to get its exact zero gradient."""
    return _pool_forward_on(backend_impl(backend, x0.device), x0, patches, kt, gamma, beta, eps,
                            dot_dtype)


@without_autocast
def _pool_forward_traced(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                         wk_bias: Optional[Tensor], eps: float, dot_dtype: Optional[torch.dtype],
                         backend: str) -> Tuple[Tensor, Tensor]:
    """:func:`_pool_forward` on the Triton kernels, launched so that the compiler records them."""
    return _pool_forward_on(traced_triton(), x0, patches, kt, gamma, beta, eps, dot_dtype)


def _pool_backward_on(impl, dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                      beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                      dot_dtype: Optional[torch.dtype]
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    d_x0, *rest = impl.attn_pool_bwd(dz, as_dtype(x0, patches.dtype), patches, kt, gamma, beta, z,
                                     lse, eps, dot_dtype)
    return (as_dtype(d_x0, x0.dtype).contiguous(), *(g.contiguous() for g in rest))


@without_autocast
def _pool_backward(dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                   beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                   dot_dtype: Optional[torch.dtype], backend: str
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx0, dpatches, dkt, dgamma, dbeta)``, contiguous (the fakes promise so); ``dx0`` in
    ``x0``'s dtype."""
    return _pool_backward_on(backend_impl(backend, x0.device), dz, x0, patches, kt, gamma, beta,
                             z, lse, eps, dot_dtype)


@without_autocast
def _pool_backward_traced(dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                          beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                          dot_dtype: Optional[torch.dtype], backend: str
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_pool_backward` on the Triton kernels, launched so that the compiler records them."""
    return _pool_backward_on(traced_triton(), dz, x0, patches, kt, gamma, beta, z, lse, eps,
                             dot_dtype)


_attn_pool = torch.library.custom_op("crossvit_fast::attn_pool", _pool_forward, mutates_args=())
_attn_pool_backward = torch.library.custom_op("crossvit_fast::attn_pool_backward", _pool_backward,
                                              mutates_args=())
# The Triton backend's token pass as the compiler sees it (None where torch has no triton_op).
_attn_pool_triton = compiler_triton_op("crossvit_fast::attn_pool_triton", _pool_forward_traced)
_attn_pool_triton_backward = compiler_triton_op("crossvit_fast::attn_pool_triton_backward",
                                                _pool_backward_traced)


@_attn_pool.register_fake
def _(x0, patches, kt, gamma, beta, wk_bias, eps, dot_dtype, backend):
    B, C = x0.shape
    H = kt.shape[1]
    acc = acc_dtype(x0)
    return x0.new_empty((B, H, C), dtype=acc), x0.new_empty((B, H), dtype=acc)


@_attn_pool_backward.register_fake
def _(dz, x0, patches, kt, gamma, beta, z, lse, eps, dot_dtype, backend):
    B, C = x0.shape
    acc = acc_dtype(x0)
    return (x0.new_empty((B, C)), patches.new_empty(patches.shape),
            x0.new_empty((B, kt.shape[1], C), dtype=acc), x0.new_empty((C,), dtype=acc),
            x0.new_empty((C,), dtype=acc))


def _setup_context(ctx, inputs, output):
    x0, patches, kt, gamma, beta, wk_bias, eps, dot_dtype, backend = inputs
    z, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(x0, patches, kt, gamma, beta, z, lse)
    ctx.wk_bias_like = None if wk_bias is None else (wk_bias.shape, wk_bias.dtype, wk_bias.device)
    ctx.config = (eps, dot_dtype, backend)


def _gradients(pool_backward):
    """The autograd backward, computing with ``pool_backward`` (the custom op or its body)."""
    def backward(ctx, dz, _dlse):
        x0, patches, kt, gamma, beta, z, lse = ctx.saved_tensors
        d_x0, d_patches, d_kt, d_gamma, d_beta = pool_backward(dz, x0, patches, kt, gamma, beta,
                                                               z, lse, *ctx.config)
        # wk's bias gets an exact zero gradient (it cancels in the softmax), not None: optimizers
        # and DDP then treat it like every other parameter.
        like = ctx.wk_bias_like
        d_wk_bias = None if like is None else torch.zeros(like[0], dtype=like[1], device=like[2])
        return (d_x0, d_patches, cast_like(d_kt, kt), cast_like(d_gamma, gamma),
                cast_like(d_beta, beta), d_wk_bias, None, None, None)
    return backward


_attn_pool.register_autograd(_gradients(_attn_pool_backward), setup_context=_setup_context)
if _attn_pool_triton is not None:
    _attn_pool_triton.register_autograd(_gradients(_attn_pool_triton_backward),
                                        setup_context=_setup_context)
_attn_pool_eager = eager_autograd("AttnPoolFunction", _pool_forward, _setup_context,
                                  _gradients(_pool_backward))


# ---------------------------------------------------------------------------------------------
# The small per-sample products around it (plain torch code).
# ---------------------------------------------------------------------------------------------

def _heads(weight: Tensor, num_heads: int, acc: torch.dtype) -> Tensor:
    """A ``[C, C]`` projection weight viewed per head: ``[H, D, C]``."""
    c_out, c_in = weight.shape
    return as_dtype(weight, acc).view(num_heads, c_out // num_heads, c_in)


def _heads_first(t: Tensor, num_heads: int) -> Tensor:
    """``[B, C]`` rows as per-head blocks, heads first: a ``[H, B, D]`` view for ``bmm``."""
    B, C = t.shape
    return t.view(B, num_heads, C // num_heads).transpose(0, 1)


def _values(z: Tensor, wv_weight: Tensor, wv_bias: Optional[Tensor], num_heads: int) -> Tensor:
    """``o = Wv z + bv`` per head, as ``[B, C]`` rows (``z``: ``[B, H, C]``)."""
    B, H, C = z.shape
    wv_h = _heads(wv_weight, num_heads, z.dtype).transpose(1, 2)          # [H, C, D]
    z_h = z.transpose(0, 1)                                               # [H, B, C]
    if wv_bias is None:
        o = torch.bmm(z_h, wv_h)
    else:
        o = torch.baddbmm(as_dtype(wv_bias, z.dtype).view(H, 1, C // H), z_h, wv_h)
    o = o.transpose(0, 1)                                                 # [B, H, D]
    if torch.compiler.is_compiling():
        # traced (torch.compile, torch.export, ONNX), the batch may be a symbol: reshape's
        # copy-or-view decision would pin it to 1, the one size where this layout is a view (a
        # guard, or an export valid for batch 1 alone); a copy decides nothing. In eager, a
        # batch of 1 keeps the free view.
        o = o.clone(memory_format=torch.contiguous_format)
    return o.reshape(B, C)


def absorbed_keys(x0: Tensor, gamma: Tensor, beta: Tensor, wq_weight: Tensor,
                  wq_bias: Optional[Tensor], wk_weight: Tensor, num_heads: int, scale: float,
                  eps: float) -> Tensor:
    """``kt = scale · Wk_hᵀ q_h`` as ``[B, H, C]`` (a view), ``q`` the query of ``LN(x0)``: the
    query pushed through each head's key projection (design.md §2), in ``x0``'s dtype."""
    acc = x0.dtype
    # the width from the parameter: a traced input's shape would not be a constant to ONNX
    q = F.linear(F.layer_norm(x0, gamma.shape, gamma, beta, eps), as_dtype(wq_weight, acc),
                 as_dtype(wq_bias, acc))
    kt = torch.bmm(_heads_first(q, num_heads), _heads(wk_weight, num_heads, acc)) * scale
    return kt.transpose(0, 1)


@without_autocast
def _cross_attention(x0: Tensor, patches: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                     wq_weight: Tensor, wq_bias: Optional[Tensor], wk_weight: Tensor,
                     wk_bias: Optional[Tensor], wv_weight: Tensor, wv_bias: Optional[Tensor],
                     proj_weight: Tensor, proj_bias: Optional[Tensor], num_heads: int,
                     scale: float, eps: float, add_residual: bool,
                     dot_dtype: Optional[torch.dtype], backend: str) -> Tensor:
    """The updated CLS rows ``[B, C]`` (``x0``'s dtype); the products in the accumulation dtype."""
    acc = acc_dtype(x0)
    # one cast of each of x0, γ and β for all its uses, so that its gradients add up in fp32
    gamma, beta, x0_acc = as_dtype(norm_weight, acc), as_dtype(norm_bias, acc), as_dtype(x0, acc)
    kt = absorbed_keys(x0_acc, gamma, beta, wq_weight, wq_bias, wk_weight, num_heads, scale, eps)
    z, _ = choose(_attn_pool, _attn_pool_eager, _pool_forward, backend, x0.device,
                  _attn_pool_triton)(
        x0_acc, patches, kt, gamma, beta, wk_bias, eps, dot_dtype, backend)
    y = F.linear(_values(z, wv_weight, wv_bias, num_heads), as_dtype(proj_weight, acc),
                 as_dtype(proj_bias, acc))
    if add_residual:
        y = y + x0_acc
    return as_dtype(y, x0.dtype)


def autocast_dot_dtype(x0: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when fp32 tokens meet the op under autocast, else None.

    timm's cross-attention runs its K/V products in that dtype under autocast, so the token
    pass may too (the Triton backend then uses the tensor cores; statistics, softmax and
    accumulation stay fp32). Outside autocast, fp32 stays fp32.
    """
    return autocast_dtype(x0.device.type) if x0.dtype == torch.float32 else None


def checked_cls_rows(op: str, cls: Tensor, patches: Tensor, num_heads: int, **weights: Tensor
                     ) -> Tuple[Tensor, int]:
    """``(cls as [B, C] rows, num_heads as a Python int)``, once ``cls``, ``patches``,
    ``num_heads`` (an integer of any kind: a NumPy integer too) and the ``[C, C]`` projection
    ``weights`` (by name) are checked to fit together; a clear error naming ``op`` and the
    argument otherwise."""
    for name, t in (("cls", cls), ("patches", patches), *weights.items()):
        check_float_tensor(name, t, op)
    if cls.dim() not in (2, 3) or (cls.dim() == 3 and cls.shape[1] != 1):
        raise ValueError(f"{op}: cls must be [B, 1, C] or [B, C], got shape {tuple(cls.shape)}")
    x0 = cls.reshape(cls.shape[0], cls.shape[-1])
    B, C = x0.shape
    if patches.dim() != 3 or patches.shape[0] != B or patches.shape[2] != C:
        raise ValueError(f"{op}: patches must be [B, N, C] = [{B}, N, {C}] to match cls, "
                         f"got shape {tuple(patches.shape)}")
    if patches.dtype != x0.dtype:
        raise TypeError(f"{op}: patches dtype {patches.dtype} must match cls dtype {x0.dtype}")
    try:
        heads = operator.index(num_heads)
    except TypeError:
        heads = 0
    if heads <= 0 or C % heads:
        raise ValueError(f"{op}: num_heads must be a positive integer dividing C={C}, "
                         f"got {num_heads!r}")
    for name, w in weights.items():
        if tuple(w.shape) != (C, C):
            raise ValueError(f"{op}: {name} must be [{C}, {C}], got {tuple(w.shape)}")
    return x0, heads


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
    x0, num_heads = checked_cls_rows(OP, cls, patches, num_heads, wq_weight=wq_weight,
                                     wk_weight=wk_weight, wv_weight=wv_weight,
                                     proj_weight=proj_weight)
    C = x0.shape[1]
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
    y = _cross_attention(
        x0, patches, norm_weight, norm_bias, wq_weight, wq_bias, wk_weight, wk_bias, wv_weight,
        wv_bias, proj_weight, proj_bias, num_heads, float(scale), float(eps), bool(add_residual),
        autocast_dot_dtype(x0), requested_backend(backend))
    return y.view(cls.shape)
