"""The CLS attention maps of the single-query cross-attention: ``a_hj = exp(s_hj − lse_h)``.

The forward token pass (:mod:`.attn_pool`) already computes the per-head log-sum-exp of the
scores; the maps are recomputed from it, run only when they are asked for, by the forward's own
scores kernel (``MAPS``): one sweep over each token's channel tiles, the same products, so the
scores are the forward's and each row sums to 1 up to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._launch import acc_dtype, contiguous_as
from .attn_pool import _plan_for, _prepare, launch_scores


def attn_weights(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                 lse: Tensor, eps: float, dot_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``a [B, H, N + 1]`` in the accumulation dtype; see ``torch_backend.attn_weights``.

    ``lse`` and ``dot_dtype`` must be those of the forward token pass that the maps belong to.
    """
    x0, patches, kt, gamma, beta = _prepare(x0, patches, kt, gamma, beta)
    lse = contiguous_as(lse, acc_dtype(x0.dtype))
    maps, *_ = launch_scores(x0, patches, kt, gamma, beta, eps, dot_dtype,
                             _plan_for(x0, patches, kt, None, dot_dtype), lse=lse)
    return maps
