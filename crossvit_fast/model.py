"""``CrossViT``: a drop-in for timm's ``CrossVit`` with fused CLS fusion, projections and norms.

Same constructor, submodule names, ``state_dict`` keys, outputs and methods as
``timm.models.crossvit.CrossVit`` (timm 1.0.x); a timm or official IBM checkpoint loads with
``strict=True`` (see :mod:`crossvit_fast.checkpoint`).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import backends, branch_streams, fused_exchange, layers, reference
from .layers import (Block, BlockChain, ClsProjection, CrossAttentionBlock, LayerNorm, NotScriptable,
                     PatchEmbed, _is_listlike, _pair, _runs_as_written, patches_along, recording_attention_maps)
from .ops._common import autocast_dtype
from .resolution import branch_sizes, resample_pos_embed
from .weight_init import trunc_normal_


@contextlib.contextmanager
def _fused_choices(backend: str, norm_min_elements: int, fused_cls_projection: bool, naive: bool,
                   branch_maps: bool = False):
    """Inside the block, the fused ops run with the given choices (backend, block-norm size
    threshold, fused CLS projection, naive math, the branch attentions' matrix path of
    ``forward_attention_maps(branches=True)``, recording nothing); the previous ones come back
    after it."""
    saved = layers.FUSED_NORM_MIN_ELEMENTS, layers.FUSED_CLS_PROJECTION
    layers.FUSED_NORM_MIN_ELEMENTS, layers.FUSED_CLS_PROJECTION = norm_min_elements, fused_cls_projection
    try:
        with (backends.use_backend(backend), reference.naive_math(naive),
              layers.branch_attention_path(branch_maps)):
            yield
    finally:
        layers.FUSED_NORM_MIN_ELEMENTS, layers.FUSED_CLS_PROJECTION = saved


def _recompute_as_in_forward():
    """``context_fn`` of the block checkpoints: the recompute in the backward makes the forward's
    fused-op choices, also where ``backward()`` runs outside the context that set them (a
    ``use_backend`` or ``naive_math`` block, a patched threshold, ``forward_attention_maps``'s
    branch maps). Another choice there would record another graph (checkpoint raises) or round
    differently (or, SDPA's dropout against attn_drop's, draw other random numbers)."""
    choices = (backends.get_backend(), layers.FUSED_NORM_MIN_ELEMENTS, layers.FUSED_CLS_PROJECTION,
               reference.naive_enabled(), layers._recording()[1])
    return contextlib.nullcontext(), _Reenterable(partial(_fused_choices, *choices))


class _Reenterable:
    """A context manager entered anew from ``make()`` each time: the checkpoint enters its
    recompute context once per backward, and a second backward (``retain_graph=True``) enters
    it again, which a generator's context manager cannot."""

    def __init__(self, make):
        self._make, self._entered = make, []

    def __enter__(self):
        context = self._make()
        self._entered.append(context)
        return context.__enter__()

    def __exit__(self, *exc_info):
        return self._entered.pop().__exit__(*exc_info)


def checkpoint_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with its activations recomputed in the backward: non-reentrant
    ``torch.utils.checkpoint``, as timm's ``checkpoint`` (RNG and autocast state replayed).
    Under ``torch.compile`` the traced graph holds the choices already, and the compiler takes
    only its own kind of ``context_fn``."""
    if torch.compiler.is_compiling():
        return checkpoint(module, x, use_reentrant=False)
    return checkpoint(module, x, use_reentrant=False, context_fn=_recompute_as_in_forward)


class MultiScaleBlock(NotScriptable, nn.Module):
    """Both branches' ViT blocks, then the CLS exchange: project, cross-attend, project back."""

    def __init__(self, dim: Sequence[int], patches: Sequence[int], depth: Sequence[int],
                 num_heads: Sequence[int], mlp_ratio: Sequence[float], qkv_bias: bool = False,
                 proj_drop: float = 0., attn_drop: float = 0.,
                 drop_path: Union[List[float], float] = 0., act_layer: Type[nn.Module] = nn.GELU,
                 norm_layer: Type[nn.Module] = LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_branches = len(dim)
        self.num_branches = num_branches
        self.grad_checkpointing = False
        if not isinstance(drop_path, (list, tuple)):
            drop_path = [drop_path] * (max(depth[:-1]) + depth[-1])
        self.blocks = nn.ModuleList()
        for d in range(num_branches):
            branch = [Block(dim=dim[d], num_heads=num_heads[d], mlp_ratio=mlp_ratio[d],
                            qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
                            drop_path=drop_path[i], norm_layer=norm_layer, **dd)
                      for i in range(depth[d])]
            if branch:
                self.blocks.append(BlockChain(*branch))
        if len(self.blocks) == 0:
            self.blocks = None

        self.projs = nn.ModuleList([
            ClsProjection(norm_layer(dim[d], **dd), act_layer(),
                          nn.Linear(dim[d], dim[(d + 1) % num_branches], **dd))
            for d in range(num_branches)])

        self.fusion = nn.ModuleList()
        for d in range(num_branches):
            d_ = (d + 1) % num_branches
            make = partial(CrossAttentionBlock, dim=dim[d_], num_heads=num_heads[d_],
                           mlp_ratio=mlp_ratio[d], qkv_bias=qkv_bias, proj_drop=proj_drop,
                           attn_drop=attn_drop, drop_path=drop_path[-1], norm_layer=norm_layer, **dd)
            if depth[-1] == 0:  # timm's "backward capability": one block, not a Sequential
                self.fusion.append(make())
            else:
                self.fusion.append(nn.Sequential(*[make() for _ in range(depth[-1])]))

        self.revert_projs = nn.ModuleList([
            ClsProjection(norm_layer(dim[(d + 1) % num_branches], **dd), act_layer(),
                          nn.Linear(dim[(d + 1) % num_branches], dim[d], **dd))
            for d in range(num_branches)])

    @staticmethod
    def _cross_attend(fusion: nn.Module, cls: Tensor, patches: Tensor) -> Tensor:
        """The fusion on ``[cls ‖ patches]``, passed as two tensors (no concatenation) to a
        block that runs as written; a hooked one gets timm's concatenated tokens."""
        first = fusion[0] if isinstance(fusion, nn.Sequential) else fusion
        if not _runs_as_written(fusion, first):
            return fusion(torch.cat((cls, patches), dim=1))
        if isinstance(fusion, nn.Sequential):
            # timm chains the blocks on their output, which is the CLS token alone
            cls = first(cls, patches)
            for block in fusion[1:]:
                cls = block(cls)
            return cls
        return fusion(cls, patches)

    def _with_cls(self, i: int, cls: Tensor, tokens: Tensor) -> Tensor:
        """``[cls ‖ tokens[:, 1:]]`` for branch ``i``: timm's concatenation (a copy of every
        token), or, where nothing records the operation (inference in eager mode) and nobody
        else can hold ``tokens``, ``cls`` written over its row 0 in place.

        Nobody else holds it where it is the result of BlockChain's fused path (``x + mlp``,
        made there: plain Blocks, no hooks) and no hook on the CLS projection kept the view of
        row 0 it was given. The other branch reads only ``tokens[:, 1:]``."""
        if self._cls_row_writable(i, cls.dtype, tokens):
            tokens[:, 0:1] = cls
            return tokens
        return torch.cat((cls, tokens[:, 1:]), dim=1)

    def _cls_row_writable(self, i: int, cls_dtype: torch.dtype, tokens: Tensor) -> bool:
        """Whether a new CLS row of ``cls_dtype`` may be written over row 0 of branch ``i``'s
        block output ``tokens`` (see :meth:`_with_cls`)."""
        blocks = self.blocks[i]
        return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing() and type(blocks) is BlockChain and len(blocks) > 0
                and all(type(b) is Block for b in blocks)
                and _runs_as_written(blocks, *blocks, *self.projs[i].modules())
                and torch.promote_types(cls_dtype, tokens.dtype) == tokens.dtype)

    def _run_branch(self, blocks: nn.Module, x: Tensor) -> Tensor:
        """A branch's ViT blocks on ``x``; with ``grad_checkpointing`` (and gradients on), each
        block is a checkpoint of its own, as timm checkpoints a ViT's blocks.

        Per block rather than per multi-scale block: only each block's input stays saved, and the
        backward recomputes one block at a time, not a whole stage (up to 7 blocks in the
        largest variants). Each block then runs on its own, without the chain's fusion of its
        closing residual add into the next block's norm (one pass over the tokens more per
        block). The CLS exchange is not recomputed: it keeps CLS-sized activations and views
        of the branch outputs. A chain with hooks of its own is one checkpoint, so that its
        hooks run. Under ``torch.func``'s transforms (per-sample gradients), which torch's
        checkpoint does not support, the blocks run without it: the same result, more memory."""
        if (not (self.grad_checkpointing and torch.is_grad_enabled())
                or reference._functorch_transform_active()):
            return blocks(x)
        if not (isinstance(blocks, nn.Sequential) and _runs_as_written(blocks)):
            return checkpoint_module(blocks, x)
        for block in blocks:
            x = checkpoint_module(block, x)
        return x

    def _exchange(self, i: int, outs_b: List[Tensor], proj_cls: Tensor) -> Tensor:
        """Branch ``i``'s tokens after the CLS exchange: its projected CLS token ``proj_cls``
        cross-attends over the other branch's patches and, projected back, takes the place of
        its CLS token."""
        other = outs_b[(i + 1) % self.num_branches]
        fused_cls = self._cross_attend(self.fusion[i], proj_cls, other[:, 1:])
        return self._with_cls(i, self.revert_projs[i](fused_cls), outs_b[i])

    def _concurrent(self, x: List[Tensor]) -> bool:
        """Whether the two branches run on two CUDA streams (:mod:`crossvit_fast.branch_streams`):
        asked for, two branches of blocks, inference, no attention maps recorded, and nothing
        hooked in the block (hooks would see another order)."""
        return (branch_streams.enabled_for(x[0]) and self.num_branches == 2
                and self.blocks is not None and len(self.blocks) == 2
                and not torch.is_grad_enabled() and layers._recording()[0] is None
                and _runs_as_written(*self.modules()))

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if self._concurrent(x):
            # branch 0's blocks, then its exchange, on a second stream beside branch 1's
            outs_b = branch_streams.run_pair(lambda i: self._run_branch(self.blocks[i], x[i]),
                                             side_reads=[x[0]])
            fused = fused_exchange.applies(self, outs_b)
            return branch_streams.run_pair(
                lambda i: (fused_exchange.exchange(self, i, outs_b) if fused else
                           self._exchange(i, outs_b, self.projs[i](outs_b[i][:, 0:1]))),
                side_reads=[outs_b[1]])   # (outs_b[0] was made on the side stream)
        outs_b = [self._run_branch(block, x[i]) for i, block in enumerate(self.blocks)]
        if fused_exchange.applies(self, outs_b):
            return [fused_exchange.exchange(self, i, outs_b) for i in range(self.num_branches)]
        proj_cls_token = [proj(outs_b[i][:, 0:1]) for i, proj in enumerate(self.projs)]
        return [self._exchange(i, outs_b, proj_cls_token[i]) for i in range(self.num_branches)]


def _check_branches(patch_size, embed_dim, num_heads, img_scale, mlp_ratio, depth) -> None:
    """One or two branches, as timm's CrossVit has CLS tokens and position embeddings for
    (a third would reuse the second's): ``patch_size`` and ``embed_dim`` one entry per branch;
    ``num_heads``, ``img_scale``, ``mlp_ratio`` at least that many and each ``depth`` entry the
    branches' depths and then the fusion's last, as timm reads them (it ignores the rest, so a
    variant's arguments build its one-branch model). A ValueError naming the argument where not."""
    for name, value in (("patch_size", patch_size), ("embed_dim", embed_dim),
                        ("num_heads", num_heads), ("mlp_ratio", mlp_ratio), ("depth", depth)):
        if not _is_listlike(value):
            raise ValueError(f"{name} must be a list or tuple with an entry per branch, got {value!r}")
    if not all(_is_listlike(cfg) for cfg in depth):
        raise ValueError(f"depth must list each multi-scale block's (branch depths..., fusion depth), "
                         f"e.g. [[1, 3, 0]] * 3, got {depth!r}")
    branches = len(patch_size)
    if branches not in (1, 2):
        raise ValueError(f"patch_size must have one entry per branch, one or two branches (timm's "
                         f"CrossVit has CLS tokens and position embeddings for two), got "
                         f"{tuple(patch_size)}")
    if len(embed_dim) != branches:
        raise ValueError(f"embed_dim must have one entry per branch ({branches}, as patch_size "
                         f"{tuple(patch_size)}), got {tuple(embed_dim)}")
    for name, value in (("num_heads", num_heads), ("img_scale", img_scale), ("mlp_ratio", mlp_ratio)):
        if len(value) < branches:
            raise ValueError(f"{name} must have an entry for each of the {branches} branches, "
                             f"got {tuple(value)}")
    if not all(isinstance(s, numbers.Real) and 0 < s < math.inf for s in img_scale[:branches]):
        raise ValueError(f"img_scale must give each branch a positive, finite scale of its image "
                         f"size, got {tuple(img_scale)}")
    depths = tuple(map(tuple, depth))
    for cfg in depths:
        if len(cfg) < max(branches, 2):
            raise ValueError(f"each depth entry must give the {branches} branches' depths, its last "
                             f"number the fusion's (at least {max(branches, 2)} numbers), got {cfg} "
                             f"in {depths}")
        if min(cfg[:branches]) < 1:
            raise ValueError(f"each depth entry must give every branch at least one block (timm's "
                             f"forward fails without), got {cfg} in {depths}")
    _check_drop_path_schedule(depths, branches)


def _check_drop_path_schedule(depths, branches: int) -> None:
    """timm's drop-path rates: ``sum(cfg[-2:])`` per depth entry, handed out
    ``max(cfg[:-1]) + cfg[-1]`` at a time; where a branch deeper than the rates left would take
    more than there are, timm fails with an IndexError: a ValueError naming ``depth`` instead."""
    total = sum(sum(cfg[-2:]) for cfg in depths)
    start = 0
    for i, cfg in enumerate(depths):
        given = max(0, min(total, start + max(cfg[:-1]) + cfg[-1]) - start)
        if given < max(cfg[:branches]):
            raise ValueError(f"depth {depths}: entry {i}, {cfg}, needs {max(cfg[:branches])} "
                             f"drop-path rates where timm's schedule (the sum of each entry's last "
                             f"two numbers, {total} in all) has {given} left; timm's CrossVit "
                             f"cannot build it either")
        start += max(cfg[:-1]) + cfg[-1]


def _compute_num_patches(img_size, patches):
    return [i[0] // p * i[1] // p for i, p in zip(img_size, patches)]


def scale_image(x: Tensor, ss: Tuple[int, int], crop_scale: bool = False) -> Tensor:
    """Resize (bicubic) or centre-crop an image batch to ``ss``, as timm does per branch."""
    H, W = x.shape[-2:]
    if H != ss[0] or W != ss[1]:
        if crop_scale and ss[0] <= H and ss[1] <= W:
            cu, cl = int(round((H - ss[0]) / 2.)), int(round((W - ss[1]) / 2.))
            x = x[:, :, cu:cu + ss[0], cl:cl + ss[1]]
        else:
            x = F.interpolate(x, size=ss, mode="bicubic", align_corners=False)
    return x


def feature_take_indices(num_features: int, indices: Optional[Union[int, List[int]]] = None
                         ) -> Tuple[List[int], int]:
    """Absolute feature indices: all if None, the last n if int, else the given (negative from end)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {idx} is out of range (0 to {num_features - 1})")
            take.append(idx)
    return take, max(take)


class InputError(ValueError, RuntimeError):
    """A bad image batch: a RuntimeError too, as torch raises inside timm's CrossVit for it
    (another channel count, another device)."""


class InputTypeError(TypeError, RuntimeError):
    """An image batch of the wrong dtype or layout: a RuntimeError too, as torch raises inside
    timm's CrossVit for it."""


class CrossViT(NotScriptable, nn.Module):
    """Dual-branch multi-scale vision transformer, timm-compatible (``timm...CrossVit``); a
    one-branch configuration (one ``patch_size``) runs as in timm, its CLS token attending over
    its own patches.

    Any ``img_size`` (a number or ``(H, W)``) builds: each branch's image is ``img_size`` scaled
    by its ``img_scale`` and rounded to whole patches (:mod:`crossvit_fast.resolution`), timm's
    sizes wherever those tile (a non-whole size as timm takes it: ``int(size * scale)``, and
    ``img_size`` its whole part). Inputs of another size are resized to it per branch, as timm
    does (with a warning, once per model); with ``dynamic_img_size=True`` every input size runs
    as is instead, the position embeddings interpolated to its patch grids per call (as timm's
    ViT option).
    """

    def __init__(
            self,
            img_size: int = 224,
            img_scale: Tuple[float, ...] = (1.0, 1.0),
            patch_size: Tuple[int, ...] = (8, 16),
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: Tuple[int, ...] = (192, 384),
            depth: Tuple[Tuple[int, ...], ...] = ((1, 3, 1), (1, 3, 1), (1, 3, 1)),
            num_heads: Tuple[int, ...] = (6, 12),
            mlp_ratio: Tuple[float, ...] = (2., 2., 4.),
            multi_conv: bool = False,
            crop_scale: bool = False,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = partial(LayerNorm, eps=1e-6),
            global_pool: str = "token",
            dynamic_img_size: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        _check_branches(patch_size, embed_dim, num_heads, _pair(img_scale), mlp_ratio, depth)
        for d, h in zip(embed_dim, num_heads):
            if d % h:
                raise ValueError(f"embed_dim {d} is not divisible by num_heads {h}")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.global_pool = global_pool
        self.img_scale = img_scale = _pair(img_scale)
        self.patch_size = tuple(patch_size)
        self.multi_conv = multi_conv
        self.img_size_scaled = branch_sizes(_pair(img_size), img_scale, patch_size, multi_conv)  # checks it
        self.img_size = tuple(int(s) for s in _pair(img_size))
        self.dynamic_img_size = dynamic_img_size
        self._warned_input_size = False
        self.crop_scale = crop_scale
        num_patches = _compute_num_patches(self.img_size_scaled, patch_size)
        self.num_branches = len(patch_size)
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = sum(embed_dim)
        self.patch_embed = nn.ModuleList()

        for i in range(self.num_branches):
            setattr(self, f"pos_embed_{i}", nn.Parameter(torch.zeros(1, 1 + num_patches[i], embed_dim[i], **dd)))
            setattr(self, f"cls_token_{i}", nn.Parameter(torch.zeros(1, 1, embed_dim[i], **dd)))

        for im_s, p, d in zip(self.img_size_scaled, patch_size, embed_dim):
            self.patch_embed.append(PatchEmbed(img_size=im_s, patch_size=p, in_chans=in_chans,
                                               embed_dim=d, multi_conv=multi_conv,
                                               strict_img_size=not dynamic_img_size, **dd))

        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        total_depth = sum([sum(x[-2:]) for x in depth])
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, total_depth, device="cpu")]
        dpr_ptr = 0
        self.blocks = nn.ModuleList()
        for block_cfg in depth:
            curr_depth = max(block_cfg[:-1]) + block_cfg[-1]
            self.blocks.append(MultiScaleBlock(
                embed_dim, num_patches, block_cfg, num_heads=num_heads, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[dpr_ptr:dpr_ptr + curr_depth], norm_layer=norm_layer, **dd))
            dpr_ptr += curr_depth

        self.num_feature_blocks = len(depth)
        self.feature_info = [
            dict(num_chs=embed_dim[b], reduction=round(patch_size[b] / img_scale[b]), module=f"blocks.{i}")
            for b in range(self.num_branches) for i in range(self.num_feature_blocks)]

        self.norm = nn.ModuleList([norm_layer(embed_dim[i], **dd) for i in range(self.num_branches)])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.ModuleList([
            nn.Linear(embed_dim[i], num_classes, **dd) if num_classes > 0 else nn.Identity()
            for i in range(self.num_branches)])

        for i in range(self.num_branches):
            trunc_normal_(getattr(self, f"pos_embed_{i}"), std=.02)
            trunc_normal_(getattr(self, f"cls_token_{i}"), std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ---- timm's model API -------------------------------------------------------------------

    def no_weight_decay(self) -> set:
        out = set()
        for i in range(self.num_branches):
            out.add(f"cls_token_{i}")
            pe = getattr(self, f"pos_embed_{i}", None)
            if pe is not None and pe.requires_grad:
                out.add(f"pos_embed_{i}")
        return out

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each ViT block's activations in the backward (timm's CrossVit raises here).
        Sets ``grad_checkpointing`` on the model and on each multi-scale block, which runs it."""
        self.grad_checkpointing = enable
        for block in self.blocks:
            block.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        ref = self.head[0].weight if isinstance(self.head[0], nn.Linear) else self.cls_token_0
        dd = {"device": ref.device, "dtype": ref.dtype}
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.ModuleList([
            nn.Linear(self.embed_dim[i], num_classes, **dd) if num_classes > 0 else nn.Identity()
            for i in range(self.num_branches)])
        self.head.train(self.training)

    def _check_input(self, x: Tensor) -> None:
        """An image batch the model can run, else an error saying what is wrong with ``x``:
        where timm's CrossVit fails inside torch with a RuntimeError, one that is also that."""
        if not isinstance(x, Tensor):
            raise TypeError(f"CrossViT: x must be a torch.Tensor image batch, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"CrossViT: x must be a 4-D image batch [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise InputError(f"CrossViT: x must have {self.in_chans} channels (in_chans), got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise InputTypeError(f"CrossViT: x must be a floating-point image batch, got {x.dtype}")
        if x.layout != torch.strided or x.is_mkldnn:
            raise InputTypeError(f"CrossViT: x must be a dense (strided) tensor, got layout {x.layout}; "
                                 f"convert it with x.to_dense()")
        param = self.cls_token_0
        if x.device != param.device:
            raise InputError(f"CrossViT: x is on {x.device} but the model is on {param.device}")
        if x.dtype != param.dtype:
            if autocast_dtype(x.device.type) is None:
                raise InputTypeError(f"CrossViT: x is {x.dtype} but the model's parameters are "
                                     f"{param.dtype}; cast one to the other, or run under torch.autocast")
            if torch.float64 in (x.dtype, param.dtype):   # autocast leaves float64 as it is
                raise InputTypeError(f"CrossViT: x is {x.dtype} but the model's parameters are "
                                     f"{param.dtype}, and autocast does not cast float64; cast one "
                                     f"to the other")

    def _branch_sizes(self, size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """Each branch's image size for inputs of ``size``: the model's (timm: the input is resized
        to it), or with ``dynamic_img_size`` the input's own, scaled per branch."""
        if self.dynamic_img_size:
            return branch_sizes(size, self.img_scale, self.patch_size, self.multi_conv,
                                what="input image size")
        # traced, the warning is skipped before the flag is read: a read would make the flag a
        # guard of the compiled graph, which an eager call setting it would then fail
        if (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and size != self.img_size and not self._warned_input_size):
            self._warned_input_size = True
            warnings.warn(
                f"CrossViT: input images of {size[0]}x{size[1]} are resized to the model's "
                f"img_size {self.img_size[0]}x{self.img_size[1]} (per branch: "
                f"{', '.join(f'{h}x{w}' for h, w in self.img_size_scaled)}), as timm's CrossVit does. "
                f"To run at their own size, build the model with img_size={size} (checkpoints "
                f"load with their position embeddings resampled) or dynamic_img_size=True. "
                f"Shown once per model.", UserWarning, stacklevel=4)
        return self.img_size_scaled

    def _grids(self, sizes: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
        """Each branch's patch grid ``(gh, gw)`` at its image size in ``sizes``."""
        return [tuple(patches_along(side, p, self.multi_conv) for side in size)
                for size, p in zip(sizes, self.patch_size)]

    def patch_grids(self, image_size: Optional[Tuple[int, int]] = None) -> List[Tuple[int, int]]:
        """Each branch's patch grid ``(gh, gw)`` for inputs of ``image_size`` (height, width): the
        model's own, or with ``dynamic_img_size`` the input's."""
        return self._grids(self.img_size_scaled if image_size is None else self._branch_sizes(tuple(image_size)))

    def _embed(self, x: Tensor) -> Tuple[List[Tensor], List[Tuple[int, int]]]:
        """The tokens ``[CLS ‖ patches] + pos_embed`` of each branch, and each branch's patch grid."""
        self._check_input(x)
        B = x.shape[0]
        xs, grids = [], []
        sizes = self._branch_sizes(tuple(x.shape[-2:]))
        for i, (patch_embed, size, grid) in enumerate(zip(self.patch_embed, sizes, self._grids(sizes))):
            x_ = patch_embed(scale_image(x, size, self.crop_scale))
            cls_tokens = (self.cls_token_0 if i == 0 else self.cls_token_1).expand(B, -1, -1)
            x_ = torch.cat((cls_tokens, x_), dim=1)
            pos_embed = self.pos_embed_0 if i == 0 else self.pos_embed_1
            if grid != patch_embed.grid_size:   # dynamic_img_size only
                pos_embed = resample_pos_embed(pos_embed, grid, patch_embed.grid_size)
            xs.append(self.pos_drop(x_ + pos_embed))
            grids.append(grid)
        return xs, grids

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[List[Tensor], List[Tensor]]]:
        """Final per-branch features and the patch-token outputs of each block (timm's layout:
        index ``b * num_blocks + i`` is branch ``b`` after block ``i``)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        reshape = output_fmt == "NCHW"
        num_blocks = self.num_feature_blocks
        take_indices, _ = feature_take_indices(self.num_branches * num_blocks, indices)
        max_block = max([idx % num_blocks for idx in take_indices])

        B = x.shape[0]
        xs, grids = self._embed(x)
        blocks = self.blocks[:max_block + 1] if stop_early else self.blocks
        branch_intermediates: List[List[Tensor]] = [[] for _ in range(self.num_branches)]
        for i, blk in enumerate(blocks):
            xs = blk(xs)
            for b, norm_layer in enumerate(self.norm):
                if b * num_blocks + i in take_indices:
                    y = norm_layer(xs[b]) if norm else xs[b]
                    branch_intermediates[b].append(y[:, 1:])

        intermediates = []
        for (H, W), branch_feats in zip(grids, branch_intermediates):
            if reshape:
                branch_feats = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in branch_feats]
            intermediates.extend(branch_feats)
        if intermediates_only:
            return intermediates
        xs = [norm_layer(xs[i]) for i, norm_layer in enumerate(self.norm)]
        return xs, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks (and optionally norm and head) not needed for ``indices``."""
        num_blocks = self.num_feature_blocks
        take_indices, _ = feature_take_indices(self.num_branches * num_blocks, indices)
        max_block = max([idx % num_blocks for idx in take_indices])
        self.blocks = self.blocks[:max_block + 1]
        if prune_norm:
            self.norm = nn.ModuleList([nn.Identity() for _ in range(self.num_branches)])
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: Tensor) -> List[Tensor]:
        xs, _ = self._embed(x)
        for blk in self.blocks:
            xs = blk(xs)
        return [norm(xs[i]) for i, norm in enumerate(self.norm)]

    def forward_head(self, xs: List[Tensor], pre_logits: bool = False) -> Tensor:
        xs = [x[:, 1:].mean(dim=1) for x in xs] if self.global_pool == "avg" else [x[:, 0] for x in xs]
        xs = [self.head_drop(x) for x in xs]
        if pre_logits or isinstance(self.head[0], nn.Identity):
            return torch.cat(xs, dim=1)
        return torch.mean(torch.stack([head(xs[i]) for i, head in enumerate(self.head)], dim=0), dim=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_attention_maps(self, x: Tensor, branches: bool = False
                               ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The logits and the attention maps, as timm's ``attn_drop`` modules receive them.

        Returns ``(logits, maps)``; ``maps`` is keyed by the name of each ``attn_drop`` module,
        in model order, as a forward hook on it (or ``timm.utils.AttentionExtract(model,
        method="hook")``) keys them. For every fusion block of every multi-scale block,
        ``blocks.{i}.fusion.{d}.attn.attn_drop`` holds the CLS token's softmax weights over
        ``[CLS ‖ the other branch's patches]``, ``[B, heads, 1, 1 + N]``: ``d = 0`` is branch 0's
        (small patches) CLS over branch 1's patch grid, ``d = 1`` branch 1's CLS over branch 0's
        grid; column 0 is the CLS token itself. Where the fusion runs fused, the maps come from
        the backend's token pass (each head's log-sum-exp) and a second pass that recomputes the
        scores (:func:`crossvit_fast.ops.cls_attention_maps`), run only here. With ``branches``
        the branch self-attention maps ``blocks.{i}.blocks.{b}.{k}.attn.attn_drop`` (``[B,
        heads, 1 + N, 1 + N]``) are added: those blocks then form their attention matrix
        instead of calling SDPA.

        The maps carry no gradient; the fusion's are fp32 (float64 for a float64 model), the
        branches' in the dtype their attention computes in (under autocast, autocast's, as
        timm's hooked maps). Eager only: the recording is not meant for ``torch.compile``.
        """
        names = {m: n for n, m in self.named_modules()}
        with recording_attention_maps(branches) as maps:
            logits = self(x)
        missing = [n for n, m in self.named_modules() if isinstance(m, CrossAttentionBlock)
                   and getattr(m.attn, "attn_drop", None) not in maps]
        if missing:
            raise RuntimeError(f"forward_attention_maps: no attention maps from {', '.join(missing)}: "
                               "their attn is not CrossViT's CrossAttention (replaced or wrapped); "
                               "register a forward hook on the module that receives the softmax")
        return logits, {names[m]: maps[m] for m in self.modules() if m in maps}
