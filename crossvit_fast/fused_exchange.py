"""A multi-scale block's CLS exchange as one Triton kernel per direction, for small-batch inference.

timm's exchange of branch ``i`` projects its CLS token to the other width (LayerNorm, GELU,
Linear), cross-attends over the other branch's patches and projects back: about 16 kernels per
direction, each a sliver of the GPU at batch 1, where their launch latencies set the time
(crossvit_fast.kernels.cls_exchange). Where :data:`layers.FUSED_CLS_EXCHANGE` is set, the model
runs each direction as one kernel instead, computing from the modules' parameters in fp32; only
where that computes what timm's modules would (:func:`applies`): inference (no autograd, no
compiler or tracer), the Triton backend, every module of the exchange timm's own and unhooked, no
attention maps recorded, widths and heads the kernel takes. Under autocast too, on fp32 tokens (or
tokens in autocast's dtype): the Linears' outputs are rounded to autocast's dtype, as timm's are,
while the kernel's products stay fp32 (as the unfused cross-attention's small products do).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import layers, reference
from .layers import ClsProjection, CrossAttentionBlock, _runs_as_written
from .ops._common import autocast_dtype, backend_impl, requested_backend


def _cross_attention_block(fusion: nn.Module):
    """The fusion's one ``CrossAttentionBlock`` (timm's module, or a Sequential of one), or None."""
    if isinstance(fusion, nn.Sequential):
        if len(fusion) != 1 or not _runs_as_written(fusion):
            return None
        fusion = fusion[0]
    return fusion if type(fusion) is CrossAttentionBlock else None


def _parameters_like(x: Tensor, *modules: nn.Module) -> bool:
    """Every parameter of ``modules`` in ``x``'s dtype and on its device."""
    return all(p.dtype == x.dtype and p.device == x.device for m in modules for p in m.parameters())


def _direction_applies(block: nn.Module, i: int, tokens: Tensor, other: Tensor) -> bool:
    from .kernels import cls_exchange
    proj, revert = block.projs[i], block.revert_projs[i]
    cab = _cross_attention_block(block.fusion[i])
    if cab is None or type(proj) is not ClsProjection or type(revert) is not ClsProjection:
        return False
    stochastic_depth = cab.training and not isinstance(cab.drop_path, nn.Identity)
    return (not stochastic_depth and cab._fusable() and _runs_as_written(cab)
            and proj.fused_math_applies() and revert.fused_math_applies()
            and _runs_as_written(proj, revert)
            and cls_exchange.fits(tokens.shape[-1], other.shape[-1], cab.attn.num_heads)
            and _parameters_like(tokens, proj, cab, revert))


def _linear_dtype(tokens: Tensor) -> Optional[torch.dtype]:
    """The dtype timm's Linears write in the exchange of ``tokens``: autocast's where it is on,
    else the tokens' own; None under autocast on 16-bit tokens of another dtype (timm's
    exchange then changes the tokens' dtype, which the kernel does not do)."""
    autocast = autocast_dtype(tokens.device.type)
    if autocast is None or autocast == tokens.dtype:
        return tokens.dtype
    return autocast if tokens.dtype == torch.float32 else None


def applies(block: nn.Module, outs_b: List[Tensor]) -> bool:
    """Whether both directions of ``block`` (a ``MultiScaleBlock``) run as the fused kernel on
    its branches' outputs ``outs_b``."""
    if (not layers.FUSED_CLS_EXCHANGE or block.num_branches != 2 or torch.is_grad_enabled()
            or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or layers._recording()[0] is not None or reference.naive_enabled()):
        return False
    x0, x1 = outs_b
    if (x0.dtype != x1.dtype or x0.device != x1.device or x0.dim() != 3 or x1.dim() != 3
            or x0.shape[0] != x1.shape[0] or x0.shape[0] > layers.FUSED_CLS_EXCHANGE_MAX_BATCH
            or x0.dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or _linear_dtype(x0) is None):
        return False
    from .backends import triton_backend
    if backend_impl(requested_backend(None), x0.device) is not triton_backend:
        return False
    return all(_direction_applies(block, i, outs_b[i], outs_b[1 - i]) for i in (0, 1))


def exchange(block: nn.Module, i: int, outs_b: List[Tensor]) -> Tensor:
    """Branch ``i``'s tokens after the fused exchange (where :func:`applies`): its CLS row
    replaced, in place where the block may write it (``MultiScaleBlock._cls_row_writable``)."""
    from .kernels import cls_exchange
    from .kernels._launch import on_device_of, token_rows
    tokens, other = token_rows(outs_b[i]), token_rows(outs_b[1 - i])
    proj, revert = block.projs[i], block.revert_projs[i]
    cab = _cross_attention_block(block.fusion[i])
    attn = cab.attn
    in_place = block._cls_row_writable(i, tokens.dtype, tokens)
    out = tokens[:, 0] if in_place else tokens.new_empty(tokens.shape[0], tokens.shape[2])
    with on_device_of(tokens):
        cls_exchange.cls_exchange(
            tokens[:, 0], other[:, 1:], out, _projection(proj),
            cls_exchange.CrossAttention(
                cab.norm1.weight, cab.norm1.bias, cab.norm1.eps, attn.wq.weight, attn.wq.bias,
                attn.wk.weight, attn.wv.weight, attn.wv.bias, attn.proj.weight, attn.proj.bias,
                attn.num_heads, attn.scale),
            _projection(revert), _linear_dtype(tokens))
    return tokens if in_place else torch.cat((out[:, None], tokens[:, 1:]), dim=1)


def _projection(proj: ClsProjection):
    from .kernels import cls_exchange
    norm, _, linear = proj
    return cls_exchange.Projection(norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)
