"""timm's truncated-normal initialisation, so that a seeded model starts from timm's weights.

timm initialises CrossViT's Linears, position embeddings and CLS tokens with its own
``trunc_normal_`` (a uniform draw mapped through the normal's inverse CDF). torch's
``nn.init.trunc_normal_`` drew the same numbers until torch 2.13, which samples another way
(rejection): same distribution, other weights for the same seed.
"""
import math

import torch
from torch import Tensor


def trunc_normal_(tensor: Tensor, mean: float = 0., std: float = 1., a: float = -2.,
                  b: float = 2.) -> Tensor:
    """Fill ``tensor`` in place from N(``mean``, ``std``²) truncated to [``a``, ``b``] (absolute
    bounds, as timm's): the random numbers timm's ``trunc_normal_`` draws. Returns ``tensor``."""
    def cdf(x: float) -> float:   # the standard normal's
        return (1. + math.erf(x / math.sqrt(2.))) / 2.
    low, high = cdf((a - mean) / std), cdf((b - mean) / std)
    with torch.no_grad():
        tensor.uniform_(2 * low - 1, 2 * high - 1)   # erf of the bounds, scaled
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
    return tensor
