"""Input resolution: each branch's image size for an input size, and position embeddings
resampled to another patch grid (a checkpoint trained at another size, or ``dynamic_img_size``).

timm's CrossVit resizes the image of each branch to ``int(size * scale)`` and sizes its position
embeddings by ``h // p * w // p``, which Python reads as ``((h // p) * w) // p``. That is the
patch embedding's token count only at some sizes: where both patch sizes divide them (240), or
the remainders are small (156: 156 and 145 px); the dagger stem's padded convs round up, so there
mostly where the patch sizes divide them. At such sizes the branch sizes are timm's. Elsewhere
(224, 288, 384, 448...) timm's forward fails, and here every branch's size is the scaled size
rounded to the nearest whole number of patches per side, which works.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import patches_along

Size = Tuple[int, int]

_logger = logging.getLogger(__name__)


def rounded_size(img_size: Size, scale: float, patch: int) -> Size:
    """``img_size`` scaled by ``scale``, each side rounded to the nearest multiple of ``patch``."""
    return tuple(int(math.floor(side * scale / patch + 0.5)) * patch for side in img_size)


def timm_runs_at(size: Size, patch: int, multi_conv: bool) -> bool:
    """Whether timm's CrossVit runs a branch at image ``size``: its patch embedding makes as
    many tokens as timm's ``h // p * w // p`` position embeddings count (none: a degenerate
    image whose lone position row timm broadcasts, not taken here)."""
    h, w = size
    tokens = patches_along(h, patch, multi_conv) * patches_along(w, patch, multi_conv)
    timm_count = h // patch * w // patch   # timm's _compute_num_patches: ((h // p) * w) // p
    return tokens > 0 and timm_count == tokens


def branch_sizes(img_size: Size, img_scale: Sequence[float], patch_size: Sequence[int],
                 multi_conv: bool = False, what: str = "img_size") -> List[Size]:
    """Each branch's image size for inputs of ``img_size``: timm's ``int(side * scale)`` where
    timm's CrossVit runs at those sizes, else each rounded to whole patches; a ValueError naming
    ``what`` and the nearest valid size where a branch would get no patch along a side."""
    if (len(img_size) != 2 or not all(isinstance(s, numbers.Real) and not isinstance(s, bool)
                                      and 0 < s < math.inf for s in img_size)):
        raise ValueError(f"{what} must be a positive number or (height, width) of positive "
                         f"numbers, got {img_size!r}")
    timm_sizes = [tuple(int(side * s) for side in img_size) for s in img_scale]
    if all(timm_runs_at(size, p, multi_conv) for size, p in zip(timm_sizes, patch_size)):
        return timm_sizes
    sizes = [rounded_size(img_size, s, p) for s, p in zip(img_scale, patch_size)]
    if all(min(size) > 0 for size in sizes):
        return sizes
    # the smallest side at which every branch gets at least one patch
    smallest = max(math.ceil(p / (2 * s)) for s, p in zip(img_scale, patch_size))
    while min(min(rounded_size((smallest, smallest), s, p)) for s, p in zip(img_scale, patch_size)) == 0:
        smallest += 1
    nearest = tuple(max(int(side), smallest) for side in img_size)
    raise ValueError(
        f"{what} {tuple(img_size)} is too small: with patch sizes {tuple(patch_size)} at scales "
        f"{tuple(round(s, 4) for s in img_scale)} a branch gets no whole patch along a side; "
        f"the nearest valid size is {nearest}")


def resample_pos_embed(pos_embed: Tensor, new_grid: Size, old_grid: Optional[Size] = None) -> Tensor:
    """``pos_embed`` ``[1, 1 + h·w, C]`` (the CLS token's row first) for a ``new_grid`` of patches:
    the patch rows resampled as an image, bicubic and antialiased, in fp32, the CLS row kept; as
    timm's ``resample_abs_pos_embed`` does for ViTs (``old_grid`` square where not given)."""
    if old_grid is None:
        side = math.isqrt(pos_embed.shape[1] - 1)
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def resample_checkpoint_pos_embeds(state: Dict[str, Tensor], grids: Sequence[Size],
                                   widths: Sequence[int]) -> Dict[str, Tensor]:
    """``state`` with each ``pos_embed_{i}`` of width ``widths[i]`` but another number of patch
    tokens than ``grids[i]`` holds (a square grid: trained at another image size) resampled to
    ``grids[i]``. Others are left alone, for the shape check to name. A checkpoint with as many
    patch tokens as the model's grid is loaded as it is: its grid's shape is not in its tensors
    (a 20x20 grid and a 10x40 one hold 400 tokens alike), and a model built at the size the
    checkpoint was made at must load it unchanged. Each resampling is logged (INFO), as timm's
    ``resample_abs_pos_embed`` logs it."""
    out = dict(state)
    for i, (grid, width) in enumerate(zip(grids, widths)):
        pos = out.get(f"pos_embed_{i}")
        if (pos is None or pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != width
                or pos.shape[1] == 1 + grid[0] * grid[1]):
            continue
        side = math.isqrt(pos.shape[1] - 1)
        if side > 0 and side * side == pos.shape[1] - 1:   # no patch rows: nothing to resample
            out[f"pos_embed_{i}"] = resample_pos_embed(pos, grid, (side, side))
            _logger.info("Resized position embedding pos_embed_%d: %s to %s.", i, (side, side), tuple(grid))
    return out
