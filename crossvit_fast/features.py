"""``features_only=True``: the model as a backbone returning per-block feature maps, as timm
1.0.31 builds CrossVit (its ``FeatureGetterNet`` over ``forward_intermediates``).

Feature ``b * num_blocks + i`` is branch ``b``'s patch tokens after multi-scale block ``i``, as
an NCHW map; by default the last block's of each branch (timm's ``out_indices``). The wrapper
prunes the blocks past the last index taken and the classifier (and the final norms unless
``norm``), and describes what it returns in ``feature_info`` (channels, reduction, module).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from torch import Tensor

OutIndices = Union[int, Sequence[int]]


class FeatureInfo:
    """timm's ``FeatureInfo``: the feature dicts of a model and the indices taken from them."""

    def __init__(self, feature_info: List[Dict], out_indices: OutIndices):
        self.out_indices = tuple(range(-out_indices, 0)) if isinstance(out_indices, int) else tuple(out_indices)
        previous = 1
        for i, info in enumerate(feature_info):
            if info.get("num_chs", 0) <= 0 or info.get("reduction", 0) < previous or "module" not in info:
                raise ValueError(f"feature_info[{i}] needs num_chs > 0, a reduction that does not "
                                 f"decrease and a module name, got {info}")
            previous = info["reduction"]
            info.setdefault("index", i)
        self.info = feature_info

    def from_other(self, out_indices: OutIndices) -> "FeatureInfo":
        return FeatureInfo(copy.deepcopy(self.info), out_indices)

    def get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None):
        """``key`` of each taken feature (``idx`` None), of the features ``idx``, or of one."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx=None):
        indices = self.out_indices if idx is None else idx
        if isinstance(indices, int):
            info = self.info[indices]
            return info if keys is None else {k: info[k] for k in keys}
        return [self.info[i] if keys is None else {k: self.info[i][k] for k in keys} for i in indices]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


def default_out_indices(num_blocks: int, num_branches: int = 2) -> Tuple[int, ...]:
    """timm's default for CrossVit: the last block's features of each branch (what the head
    uses), ``(num_blocks - 1, 2 * num_blocks - 1)`` for two branches."""
    return tuple(b * num_blocks + num_blocks - 1 for b in range(num_branches))


class FeatureGetterNet(nn.ModuleDict):
    """A CrossViT returning ``forward_intermediates(x, indices=out_indices,
    intermediates_only=True)``: a list of NCHW maps (``output_fmt="NLC"``: token rows)."""

    def __init__(self, model: nn.Module, out_indices: OutIndices = 4, out_map=None,
                 return_dict: bool = False, output_fmt: str = "NCHW", norm: bool = False,
                 prune: bool = True):
        super().__init__()
        if prune:   # absolute indices from here on: negative ones would shift after pruning
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        self.feature_info = FeatureInfo(copy.deepcopy(model.feature_info), out_indices)
        self.model = model
        self.out_indices = out_indices
        # timm's FeatureGetterNet keeps these and returns the list all the same
        self.out_map, self.return_dict = out_map, return_dict
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True)
