"""LayerNorm with an optional fused residual add, as an autograd-aware custom op.

``add_layer_norm(x, residual)`` returns ``(LN(x + residual), x + residual)``: the pre-norm ViT
block's ``x = x + attn(...)`` followed by ``norm2(x)`` reads and writes the token tensor once.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._common import (FLOAT_DTYPES, backend_impl, cast_like, check_float_tensor, check_same_device,
                      check_vector, choose, compiler_triton_op, eager_autograd,
                      own_gradient_if_leaves, requested_backend, traced_triton, without_autocast)

OP = "layer_norm"


def _forward_on(impl, x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                eps: float, out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, h, mean, rstd = impl.layer_norm_fwd(x, residual, weight, bias, eps, out_dtype)
    return y, (h if residual is not None else x.new_empty(0)), mean, rstd


@without_autocast
def _forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float,
             out_dtype: Optional[torch.dtype], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, h, mean, rstd)`` over rows ``[M, C]``; ``h`` is empty when there is no residual
    (an op output may not alias its input ``x``)."""
    return _forward_on(backend_impl(backend, x.device), x, residual, weight, bias, eps, out_dtype)


@without_autocast
def _forward_traced(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float,
                    out_dtype: Optional[torch.dtype], backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_forward` on the Triton kernels, launched so that the compiler records them."""
    return _forward_on(traced_triton(), x, residual, weight, bias, eps, out_dtype)


@without_autocast
def _backward_rows(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor,
                   mean: Tensor, rstd: Tensor, backend: str) -> List[Tensor]:
    return list(backend_impl(backend, h.device).layer_norm_bwd(dy, dh, h, weight, mean, rstd))


@without_autocast
def _backward_rows_traced(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor,
                          mean: Tensor, rstd: Tensor, backend: str) -> List[Tensor]:
    """:func:`_backward_rows` on the Triton kernels, launched so that the compiler records them."""
    return list(traced_triton().layer_norm_bwd(dy, dh, h, weight, mean, rstd))


_layer_norm = torch.library.custom_op("crossvit_fast::layer_norm", _forward, mutates_args=())
_layer_norm_backward = torch.library.custom_op("crossvit_fast::layer_norm_backward", _backward_rows,
                                               mutates_args=())
# The Triton backend's LayerNorm as the compiler sees it (None where torch has no triton_op).
_layer_norm_triton = compiler_triton_op("crossvit_fast::layer_norm_triton", _forward_traced)
_layer_norm_triton_backward = compiler_triton_op("crossvit_fast::layer_norm_triton_backward",
                                                 _backward_rows_traced)


@_layer_norm.register_fake
def _(x, residual, weight, bias, eps, out_dtype, backend):
    M = x.shape[0]
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    # outputs are contiguous whatever the inputs' strides (empty_like would copy a permuted layout)
    return (x.new_empty(x.shape, dtype=out_dtype or dtype),
            x.new_empty(x.shape, dtype=dtype) if residual is not None else x.new_empty(0),
            x.new_empty((M,), dtype=stat), x.new_empty((M,), dtype=stat))


@_layer_norm_backward.register_fake
def _(dy, dh, h, weight, mean, rstd, backend):
    stat = torch.float64 if h.dtype == torch.float64 else torch.float32
    C = h.shape[1]
    return [h.new_empty(h.shape), h.new_empty((C,), dtype=stat), h.new_empty((C,), dtype=stat)]


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype, backend = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.has_residual = residual is not None
    ctx.input_dtypes = (x.dtype, None if residual is None else residual.dtype)
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)
    ctx.backend = backend


def _gradients(backward_rows):
    """The autograd backward, computing with ``backward_rows`` (the custom op or its body)."""
    def backward(ctx, dy, dh, _dmean, _drstd):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = backward_rows(dy, dh if ctx.has_residual else None, h, weight, mean, rstd,
                                   ctx.backend)
        x_dtype, residual_dtype = ctx.input_dtypes
        return (dx.to(x_dtype), None if residual_dtype is None else dx.to(residual_dtype),
                cast_like(dw, weight), cast_like(db, bias), None, None, None)
    return backward


_layer_norm.register_autograd(_gradients(_layer_norm_backward), setup_context=_setup_context)
if _layer_norm_triton is not None:
    _layer_norm_triton.register_autograd(_gradients(_layer_norm_triton_backward),
                                         setup_context=_setup_context)
_layer_norm_eager = eager_autograd("LayerNormFunction", _forward, _setup_context,
                                   _gradients(_backward_rows))


def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                   eps: float = 1e-6, backend: Optional[str] = None,
                   out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """``(LayerNorm(x + residual), x + residual)`` over the last dim in one pass.

    With ``residual=None`` this is plain LayerNorm and the second result is ``x`` itself. Mixed
    dtypes promote as ``x + residual`` does (e.g. a bf16 branch output under autocast added to
    the fp32 residual stream): both results are in the promoted dtype. The Triton kernel reads
    each input in its own dtype (no converted copy; the CUDA backend converts first). ``backend`` picks ``auto``/``triton``/``cuda``/
    ``torch`` for this call. ``out_dtype`` writes the normalized result in another float dtype,
    e.g. the autocast dtype when it only feeds a Linear that would cast it anyway.
    """
    check_float_tensor("x", x, OP)
    C = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or C == 0:
        raise ValueError(f"{OP}: x must have a non-empty last dim of normalized features, got {tuple(x.shape)}")
    check_vector(OP, "weight", weight, C)
    check_vector(OP, "bias", bias, C)
    if residual is not None:
        check_float_tensor("residual", residual, OP)
        if residual.shape != x.shape:
            raise ValueError(f"{OP}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: out_dtype must be one of {FLOAT_DTYPES} or None, got {out_dtype}")
    check_same_device(OP, x=x, residual=residual, weight=weight, bias=bias)
    rows = x.reshape(-1, C)
    res_rows = None if residual is None else own_gradient_if_leaves(residual, x).reshape(-1, C)
    backend = requested_backend(backend)
    run = choose(_layer_norm, _layer_norm_eager, _forward, backend, x.device, _layer_norm_triton)
    y, h, _, _ = run(rows, res_rows, weight, bias, float(eps), out_dtype, backend)
    return y.view(x.shape), (x if residual is None else h.view(x.shape))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6,
               backend: Optional[str] = None) -> Tensor:
    """LayerNorm over the last dim (fp32 statistics, output in ``x``'s dtype)."""
    return add_layer_norm(x, None, weight, bias, eps, backend)[0]
