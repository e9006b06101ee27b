"""The CLS attention maps of the cross-attention: what timm's ``attn_drop`` receives.

timm's ``CrossAttention`` forms ``softmax(q kᵀ · scale)`` over ``[CLS ‖ other branch's patches]``
(``[B, H, 1, 1 + N]``) and passes it to ``attn_drop``. The fused op never forms it: its token pass
keeps only each head's log-sum-exp of the scores. Here, only when the maps are asked for, the
backend's forward token pass gives ``lse`` and a second pass over the tokens recomputes each score
and writes ``a = exp(s − lse)`` (``attn_weights``), without K or V. The maps carry no gradient:
they are for looking at, and attention-rollout style analyses of a trained model.
"""
from typing import Optional

import torch
from torch import Tensor

from ._common import (acc_dtype, as_dtype, backend_impl, check_same_device, check_vector,
                      requested_backend, without_autocast)
from .cross_attention import absorbed_keys, autocast_dot_dtype, checked_cls_rows

OP = "cls_attention_maps"


@without_autocast
def _maps(x0: Tensor, patches: Tensor, norm_weight: Tensor, norm_bias: Tensor, wq_weight: Tensor,
          wq_bias: Optional[Tensor], wk_weight: Tensor, num_heads: int, scale: float, eps: float,
          dot_dtype: Optional[torch.dtype], backend: str) -> Tensor:
    """``[B, H, 1 + N]`` in the accumulation dtype. The query and ``kt = scale · Wk_hᵀ q_h``
    are the cross-attention op's, so the scores are those its token pass softmaxes."""
    acc = acc_dtype(x0)
    gamma, beta = as_dtype(norm_weight, acc), as_dtype(norm_bias, acc)
    kt = absorbed_keys(as_dtype(x0, acc), gamma, beta, wq_weight, wq_bias, wk_weight, num_heads,
                       scale, eps)
    impl = backend_impl(backend, x0.device)
    _, lse = impl.attn_pool_fwd(x0, patches, kt, gamma, beta, eps, dot_dtype)
    return impl.attn_weights(x0, patches, kt, gamma, beta, lse, eps, dot_dtype)


def cls_attention_maps(cls: Tensor, patches: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                       wq_weight: Tensor, wq_bias: Optional[Tensor], wk_weight: Tensor,
                       num_heads: int, scale: float, eps: float = 1e-6,
                       backend: Optional[str] = None) -> Tensor:
    """The softmax weights of the CLS token over ``[cls ‖ patches]``, per head, as timm's
    ``CrossAttention`` passes them to ``attn_drop``: ``[B, H, 1, 1 + N]`` (column 0 is the CLS
    token itself), fp32 (float64 for float64 inputs), without gradient.

    Arguments as for :func:`crossvit_fast.ops.cls_cross_attention` (``wk``'s bias shifts every
    score of a head alike, which the softmax cancels, so it is not taken; ``wv`` and ``proj``
    do not enter). Under autocast the scores use the autocast dtype's products as the
    cross-attention op's token pass does, so the maps are that pass's softmax.
    """
    x0, num_heads = checked_cls_rows(OP, cls, patches, num_heads, wq_weight=wq_weight,
                                     wk_weight=wk_weight)
    C = x0.shape[1]
    check_vector(OP, "norm_weight", norm_weight, C)
    check_vector(OP, "norm_bias", norm_bias, C)
    check_vector(OP, "wq_bias", wq_bias, C, optional=True)
    check_same_device(OP, cls=cls, patches=patches, norm_weight=norm_weight, norm_bias=norm_bias,
                      wq_weight=wq_weight, wq_bias=wq_bias, wk_weight=wk_weight)
    if patches.stride(-1) != 1:
        patches = patches.contiguous()
    dot_dtype = autocast_dot_dtype(x0)   # the cross-attention op's: the same scores as its pass
    with torch.no_grad():
        maps = _maps(x0.detach(), patches.detach(), norm_weight, norm_bias, wq_weight, wq_bias,
                     wk_weight, num_heads, float(scale), float(eps), dot_dtype,
                     requested_backend(backend))
    return maps.unsqueeze(2)
