"""LayerNorm statistics of rows taken one channel tile at a time, so that no program holds a whole
row (design.md §2, resource budget).

Each tile's mean and centred sum of squares are exact within the tile and merged into the running
ones with Chan's parallel update, as stable as the two-pass variance over the whole row (no
``E[x²] − E[x]²`` cancellation when a row's mean is large against its spread).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def merge_tile_stats(mean, m2, seen, x, mask, cols_in_tile):
    """Running ``(mean, m2)`` of rows (``[R]`` each, over the ``seen`` columns before this tile)
    merged with the tile ``x`` ``[R, BLOCK]`` (accumulation dtype, zero outside ``mask``) of
    ``cols_in_tile ≥ 1`` valid columns. The counts are taken in the accumulation dtype: integer
    division would round the merge weights to fp32 (and fp64 statistics to fp32 accuracy)."""
    seen = tl.cast(seen, mean.dtype)
    cols_in_tile = tl.cast(cols_in_tile, mean.dtype)
    tile_mean = tl.sum(x, 1) / cols_in_tile
    centred = tl.where(mask, x - tile_mean[:, None], 0.0)
    total = seen + cols_in_tile
    delta = tile_mean - mean
    mean = mean + delta * (cols_in_tile / total)
    # the weight first: on the first tile it is 0, and 0·delta² would be NaN where a huge tile
    # mean overflows delta² (a row's m2 then overflows to inf, as ATen's does: rstd 0, finite)
    m2 = m2 + tl.sum(centred * centred, 1) + delta * (delta * (seen * cols_in_tile / total))
    return mean, m2


@triton.jit
def rstd_of(m2, C, eps: tl.constexpr):
    """``1 / sqrt(var + eps)`` with the biased variance ``m2 / C``, as LayerNorm takes it."""
    return 1.0 / tl.sqrt(m2 / C + eps)
