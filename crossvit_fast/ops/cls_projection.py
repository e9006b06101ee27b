"""CrossViT's CLS projection ``Linear(GELU(LayerNorm(x)))`` as one autograd-aware custom op.

``projs[i]`` and ``revert_projs[i]`` of every multi-scale block map one token per sample between
the two branch widths; fusing the three steps saves two round trips of tiny tensors and two
kernel launches each time.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._common import (backend_impl, cast_like, check_float_tensor, check_same_device, check_vector,
                      choose, compiler_triton_op, eager_autograd, requested_backend, traced_triton,
                      without_autocast)

OP = "cls_projection"


@without_autocast
def _forward(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
             eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return backend_impl(backend, x.device).cls_proj_fwd(x, ln_weight, ln_bias, weight, bias, eps)


@without_autocast
def _forward_traced(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                    eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`_forward` on the Triton kernels, launched so that the compiler records them."""
    return traced_triton().cls_proj_fwd(x, ln_weight, ln_bias, weight, bias, eps)


@without_autocast
def _backward_rows(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor,
                   mean: Tensor, rstd: Tensor, backend: str) -> List[Tensor]:
    return list(backend_impl(backend, x.device).cls_proj_bwd(dy, x, ln_weight, ln_bias, weight,
                                                             mean, rstd))


@without_autocast
def _backward_rows_traced(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor,
                          mean: Tensor, rstd: Tensor, backend: str) -> List[Tensor]:
    """:func:`_backward_rows` on the Triton kernels, launched so that the compiler records them."""
    return list(traced_triton().cls_proj_bwd(dy, x, ln_weight, ln_bias, weight, mean, rstd))


_cls_proj = torch.library.custom_op("crossvit_fast::cls_proj", _forward, mutates_args=())
_cls_proj_backward = torch.library.custom_op("crossvit_fast::cls_proj_backward", _backward_rows,
                                             mutates_args=())
# The Triton backend's CLS projection as the compiler sees it (None where torch has no triton_op).
_cls_proj_triton = compiler_triton_op("crossvit_fast::cls_proj_triton", _forward_traced)
_cls_proj_triton_backward = compiler_triton_op("crossvit_fast::cls_proj_triton_backward",
                                               _backward_rows_traced)


@_cls_proj.register_fake
def _(x, ln_weight, ln_bias, weight, bias, eps, backend):
    M = x.shape[0]
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty((M, weight.shape[0])), x.new_empty((M,), dtype=stat),
            x.new_empty((M,), dtype=stat))


@_cls_proj_backward.register_fake
def _(dy, x, ln_weight, ln_bias, weight, mean, rstd, backend):
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    c_out, c_in = weight.shape
    return [x.new_empty(x.shape), x.new_empty((c_in,), dtype=stat),
            x.new_empty((c_in,), dtype=stat), x.new_empty((c_out, c_in), dtype=stat),
            x.new_empty((c_out,), dtype=stat)]


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, bias, mean, rstd)
    ctx.backend = backend


def _gradients(backward_rows):
    """The autograd backward, computing with ``backward_rows`` (the custom op or its body)."""
    def backward(ctx, dy, _dmean, _drstd):
        x, ln_weight, ln_bias, weight, bias, mean, rstd = ctx.saved_tensors
        dx, d_lnw, d_lnb, dw, db = backward_rows(dy, x, ln_weight, ln_bias, weight, mean, rstd,
                                                 ctx.backend)
        return (dx, cast_like(d_lnw, ln_weight), cast_like(d_lnb, ln_bias), cast_like(dw, weight),
                cast_like(db, bias), None, None)
    return backward


_cls_proj.register_autograd(_gradients(_cls_proj_backward), setup_context=_setup_context)
if _cls_proj_triton is not None:
    _cls_proj_triton.register_autograd(_gradients(_cls_proj_triton_backward),
                                       setup_context=_setup_context)
_cls_proj_eager = eager_autograd("ClsProjectionFunction", _forward, _setup_context,
                                 _gradients(_backward_rows))


def cls_projection(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                   eps: float = 1e-6, backend: Optional[str] = None) -> Tensor:
    """``Linear(GELU(LayerNorm(x)))`` over the last dim (exact erf GELU), fused.

    ``x``: ``[..., C_in]`` (e.g. the CLS view ``tokens[:, 0:1]``); ``weight``: ``[C_out, C_in]``.
    ``backend`` picks ``auto``/``triton``/``cuda``/``torch`` for this call.
    """
    for name, t in (("x", x), ("weight", weight)):
        check_float_tensor(name, t, OP)
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be [C_out, C_in], got {tuple(weight.shape)}")
    c_out, c_in = weight.shape
    if c_in == 0:
        raise ValueError(f"{OP}: weight must have a non-empty input width, got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != c_in:
        raise ValueError(f"{OP}: x must be [..., {c_in}] to match weight, got {tuple(x.shape)}")
    check_vector(OP, "ln_weight", ln_weight, c_in)
    check_vector(OP, "ln_bias", ln_bias, c_in)
    check_vector(OP, "bias", bias, c_out)
    check_same_device(OP, x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias)
    rows = x.reshape(-1, c_in)
    backend = requested_backend(backend)
    run = choose(_cls_proj, _cls_proj_eager, _forward, backend, x.device, _cls_proj_triton)
    y, _, _ = run(rows, ln_weight, ln_bias, weight, bias, float(eps), backend)
    return y.view(*x.shape[:-1], c_out)
