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
import torch.nn.functional as F
from torch import Tensor

from ._common import (acc_dtype, as_dtype, autocast_dtype, backend_impl, check_float_tensor,
                      check_same_device, check_vector, requested_backend, without_autocast)

OP = "cls_attention_maps"


@without_autocast
def _maps(x0: Tensor, patches: Tensor, norm_weight: Tensor, norm_bias: Tensor, wq_weight: Tensor,
          wq_bias: Optional[Tensor], wk_weight: Tensor, num_heads: int, scale: float, eps: float,
          dot_dtype: Optional[torch.dtype], backend: str) -> Tensor:
    """``[B, H, 1 + N]`` in the accumulation dtype. The query and ``kt = scale · Wk_hᵀ q_h``
    are the cross-attention op's, so the scores are those its token pass softmaxes."""
    acc = acc_dtype(x0)
    B, C = x0.shape
    gamma, beta, x0_acc = as_dtype(norm_weight, acc), as_dtype(norm_bias, acc), as_dtype(x0, acc)
    q = F.linear(F.layer_norm(x0_acc, (C,), gamma, beta, eps), as_dtype(wq_weight, acc),
                 as_dtype(wq_bias, acc))
    kt = torch.einsum("bhd,hdc->bhc", q.view(B, num_heads, C // num_heads),
                      as_dtype(wk_weight, acc).view(num_heads, C // num_heads, C)) * scale
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
    for name, t in (("cls", cls), ("patches", patches), ("wq_weight", wq_weight),
                    ("wk_weight", wk_weight)):
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
    for name, w in (("wq_weight", wq_weight), ("wk_weight", wk_weight)):
        if tuple(w.shape) != (C, C):
            raise ValueError(f"{OP}: {name} must be [{C}, {C}], got {tuple(w.shape)}")
    check_vector(OP, "norm_weight", norm_weight, C)
    check_vector(OP, "norm_bias", norm_bias, C)
    check_vector(OP, "wq_bias", wq_bias, C, optional=True)
    check_same_device(OP, cls=cls, patches=patches, norm_weight=norm_weight, norm_bias=norm_bias,
                      wq_weight=wq_weight, wq_bias=wq_bias, wk_weight=wk_weight)
    if patches.stride(-1) != 1:
        patches = patches.contiguous()
    # the cross-attention op's dot dtype (its _autocast_dot_dtype): the same scores as its pass
    dot_dtype = autocast_dtype(x0.device.type) if x0.dtype == torch.float32 else None
    with torch.no_grad():
        maps = _maps(x0.detach(), patches.detach(), norm_weight, norm_bias, wq_weight, wq_bias,
                     wk_weight, num_heads, float(scale), float(eps), dot_dtype,
                     requested_backend(backend))
    return maps.unsqueeze(2)
