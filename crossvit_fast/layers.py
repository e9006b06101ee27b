"""Drop-in modules with timm's submodule names, running the fused ops where they apply.

Each module keeps the parameters and child names of its timm counterpart (so ``state_dict`` keys
are timm's) and falls back to timm's own math (:mod:`crossvit_fast.reference`) where a fused op
does not apply: a non-affine or non-LayerNorm norm layer, dropout inside the attention while
training, or inside :func:`crossvit_fast.reference.naive_math`. Block norms over fewer than
:data:`FUSED_NORM_MIN_ELEMENTS` elements run ATen's add and LayerNorm (cheaper on the host), and
so does every block norm under ``torch.compile``, which fuses them itself.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
import sys
import threading
from collections.abc import Iterable
from typing import Dict, Iterator, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as nn_module

from . import ops, reference
from .ops._common import autocast_dtype


# A block norm (with or without its residual add) over fewer elements than this runs ATen's
# kernels instead of the fused op. On an H100, below about this size (crossvit_18_240 at batch
# ~180) a model step is set by the host, not the GPU, and the fused op costs more host time per
# call than ATen's add and LayerNorm (bench/results/gpu-check-nvidia-h100.md, runs 5-7); above
# it the fused kernel's GPU time wins (2.7 TB/s, against 1.0-1.7 TB/s for ATen's add and
# LayerNorm). Not yet measured end to end on a GPU with this threshold. Set to 0 to always fuse.
FUSED_NORM_MIN_ELEMENTS = 1 << 24


# The CLS projections (LN → GELU → Linear over one row per sample) run as timm's three modules
# unless this is True. On an H100 at crossvit_18_240's shapes, batch 256, bf16, the fused op took
# 18 µs of GPU time forward and 69 µs forward+backward, against 7 and 26 µs for ATen's LayerNorm,
# GELU and cuBLAS GEMM, and more host time per call (bench/results/kernels-nvidia-h100-80gb-hbm3.md,
# run 9 of bench/results/gpu-check-nvidia-h100.md): too few rows for the fused kernel to pay.
FUSED_CLS_PROJECTION = False


# Inference on the Triton backend (under autocast too), up to this batch, runs each branch's whole
# CLS exchange (projection, cross-attention, projection back) as one kernel where this is True
# (crossvit_fast.kernels.cls_exchange): about 16 kernels fewer per direction, whose launch
# latencies set a batch-1 forward's time. Off until scripts/graphs_ab.py has timed it on a GPU.
FUSED_CLS_EXCHANGE = False
FUSED_CLS_EXCHANGE_MAX_BATCH = 16


@contextlib.contextmanager
def always_fuse_norms() -> Iterator[None]:
    """Inside the block, every block norm runs the fused op whatever its size: for code whose
    host time does not count, such as a forward captured into a CUDA graph."""
    global FUSED_NORM_MIN_ELEMENTS
    saved, FUSED_NORM_MIN_ELEMENTS = FUSED_NORM_MIN_ELEMENTS, 0
    try:
        yield
    finally:
        FUSED_NORM_MIN_ELEMENTS = saved


# While CrossViT.forward_attention_maps runs, per thread (threading.get_ident()): the dict of
# each attention module's ``attn_drop`` → the softmax weights it receives (the CLS
# cross-attentions always; the branch self-attentions where ``branches``), and ``branches``, the
# branch attentions' matrix path (also set, with no dict, for the checkpoints' recompute). Per
# thread: another thread's plain forward must not record into it, pay for it, or leave SDPA.
# None while no thread records: a plain forward reads one global (torch.compile guards it).
# Replaced, never changed in place, under the lock: a reader sees a whole mapping.
_recordings: Optional[Dict[int, Tuple[Optional[Dict[nn.Module, Tensor]], bool]]] = None
_recordings_lock = threading.Lock()


def _recording() -> Tuple[Optional[Dict[nn.Module, Tensor]], bool]:
    """``(maps dict or None, branch matrix path)`` of this thread's recording."""
    recordings = _recordings
    if recordings is None:
        return None, False
    return recordings.get(threading.get_ident(), (None, False))


def _set_recording(state: Optional[Tuple[Optional[Dict[nn.Module, Tensor]], bool]]):
    """Sets this thread's recording to ``state`` (None: none); returns the one it replaces."""
    global _recordings
    ident = threading.get_ident()
    with _recordings_lock:
        recordings = dict(_recordings or {})
        saved = recordings.pop(ident, None)
        if state is not None:
            recordings[ident] = state
        _recordings = recordings or None
    return saved


@contextlib.contextmanager
def recording_attention_maps(branches: bool = False) -> Iterator[Dict[nn.Module, Tensor]]:
    """Inside the block, in this thread, every CLS cross-attention (and with ``branches`` every
    branch self-attention) records the softmax weights its ``attn_drop`` receives, detached,
    into the yielded dict under that ``attn_drop`` module."""
    maps: Dict[nn.Module, Tensor] = {}
    saved = _set_recording((maps, branches))
    try:
        yield maps
    finally:
        _set_recording(saved)


@contextlib.contextmanager
def branch_attention_path(branches: bool) -> Iterator[None]:
    """Inside the block, in this thread, the branch attentions take the path a recording with
    ``branches`` takes (the attention matrix, where True), recording nothing: for the
    checkpoints' recompute of a forward that recorded."""
    saved = _set_recording((None, branches) if branches else None)
    try:
        yield
    finally:
        _set_recording(saved)


def _recording_attn_drop(attn_drop: nn.Module, record: bool, at_least_fp32: bool = False):
    """``attn_drop`` itself, or where ``record`` and this thread records, a callable that
    records its input first (with ``at_least_fp32`` a 16-bit one as fp32)."""
    maps = _recording()[0] if record else None
    if maps is None:
        return attn_drop

    def record_then_drop(a: Tensor) -> Tensor:
        kept = a.detach()
        maps[attn_drop] = kept.to(torch.promote_types(kept.dtype, torch.float32)) if at_least_fp32 else kept
        return attn_drop(a)
    return record_then_drop


# True while create_model(exportable=True) builds a model, as timm's set_layer_config does.
_exportable = False


@contextlib.contextmanager
def exportable_layers(enabled: bool = True) -> Iterator[None]:
    """Inside the block, layers built take timm's ``exportable`` setting: attention without SDPA."""
    global _exportable
    saved, _exportable = _exportable, enabled
    try:
        yield
    finally:
        _exportable = saved


def use_fused_attn() -> bool:
    """The default of :attr:`Attention.fused_attn`, as timm's: off while building exportable
    layers (:func:`exportable_layers`), else timm's own setting where timm is imported
    (``timm.layers.set_fused_attn``), else its ``TIMM_FUSED_ATTN`` environment variable (``0``
    turns SDPA off)."""
    if _exportable:
        return False
    timm_config = sys.modules.get("timm.layers.config")
    if timm_config is not None and hasattr(timm_config, "use_fused_attn"):
        return bool(timm_config.use_fused_attn())
    return int(os.environ.get("TIMM_FUSED_ATTN", "1")) > 0


def _runs_as_written(*modules: nn.Module) -> bool:
    """True where calling each module only runs its own ``forward``: no forward or backward
    hooks on it (nor global ones), no forward compiled on its own. A fused op may then compute
    in its place without skipping anything a user attached."""
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks):
        return False
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks)
               and getattr(m, "_compiled_call_impl", None) is None for m in modules)


def _fusable_norm(norm: nn.Module) -> bool:
    """A LayerNorm over one trailing dim with weight and bias (not a subclass of another kind,
    not hooked): what the fused ops implement."""
    return (type(norm) in (nn.LayerNorm, LayerNorm) and len(norm.normalized_shape) == 1
            and norm.weight is not None and norm.bias is not None
            and _runs_as_written(norm) and not reference.naive_enabled())


def _fuse_block_norm(norm: nn.Module, x: Tensor) -> bool:
    """Whether a block norm over ``x`` runs the fused op: a fusable LayerNorm, at least
    :data:`FUSED_NORM_MIN_ELEMENTS` elements, and not while ``torch.compile`` traces.

    Under the compiler the norms stay ATen's: inductor fuses the residual add and LayerNorm into
    its own kernel, which on an H100 (crossvit_18_240 shapes, batch 256, bf16) took 98% of the
    copy bandwidth forward and 83% forward+backward against the fused op's 93% and 60%
    (bench/results/kernels-nvidia-h100-80gb-hbm3.md), and it costs no custom-op call on the host.
    """
    # is_compiling first: under the compiler the size test would add a shape guard (and a
    # recompile across the threshold with dynamic shapes) for a decision that is already made
    return (not torch.compiler.is_compiling() and x.numel() >= FUSED_NORM_MIN_ELEMENTS
            and _fusable_norm(norm))


def _linear_input_dtype(dtype: torch.dtype, device_type: str) -> Optional[torch.dtype]:
    """The dtype that a Linear under autocast casts a LayerNorm output computed from ``dtype``
    rows to, or None where nothing is cast (no autocast, or float64, which autocast leaves
    alone). timm's LayerNorm under autocast returns fp32 whatever its input; the Linear then
    rounds that once to the autocast dtype."""
    return None if dtype == torch.float64 else autocast_dtype(device_type)


def add_and_norm(norm: nn.Module, x: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` (``(norm(x), x)`` without a residual), in one fused
    pass when ``norm`` is a LayerNorm (see :func:`_fuse_block_norm` for when), for a norm that
    feeds a Linear: under autocast the normalized result comes out in the autocast dtype, the
    bits the Linear's own cast of the fp32 result would give, without that extra pass over the
    tokens."""
    if _fuse_block_norm(norm, x):
        h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps,
                                  out_dtype=_linear_input_dtype(h_dtype, x.device.type))
    h = x if residual is None else x + residual
    return norm(h), h


class NotScriptable:
    """Mixin for the modules whose forward calls the fused ops: ``torch.jit.script`` calls
    ``__prepare_scriptable__`` first, and here that says why scripting cannot work and what
    does, instead of TorchScript's error about some line of Python."""

    def __prepare_scriptable__(self):
        raise NotImplementedError(
            f"crossvit_fast.{type(self).__name__} cannot be compiled by torch.jit.script: its "
            "fused ops are Python custom ops, which TorchScript cannot compile. "
            "torch.jit.trace(model, example), torch.export and torch.compile work; for a "
            "scripted model, script timm's CrossVit with this model's state_dict (same keys)")


class LayerNorm(NotScriptable, nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim through the fused LayerNorm op (fp32 statistics), from
    :data:`FUSED_NORM_MIN_ELEMENTS` elements up, outside ``torch.compile``."""

    def forward(self, x: Tensor) -> Tensor:
        if _fuse_block_norm(self, x):
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def drop_path(x: Tensor, drop_prob: float = 0., training: bool = False,
              scale_by_keep: bool = True) -> Tensor:
    """Stochastic depth per sample, as timm's ``drop_path`` (same random draws)."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``)."""

    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


# timm's three-conv stems (``multi_conv``, the dagger variants) per patch size: (kernel, stride,
# padding) of each conv, with ReLUs between them.
MULTI_CONV_STEMS = {12: ((7, 4, 3), (3, 3, 0), (3, 1, 1)), 16: ((7, 4, 3), (3, 2, 1), (3, 2, 1))}


def patches_along(side: int, patch: int, multi_conv: bool = False) -> int:
    """How many patch tokens :class:`PatchEmbed` makes along an image side of ``side`` pixels:
    ``side // patch`` for the strided conv; the stem's own arithmetic for ``multi_conv``, which
    differs where ``patch`` does not divide ``side`` (its padded convs round up). A ValueError
    where ``multi_conv`` asks for a stem timm has no design for."""
    if not multi_conv:
        return side // patch
    if patch not in MULTI_CONV_STEMS:
        raise ValueError(f"multi_conv supports patch_size 12 or 16, got {patch}")
    for kernel, stride, padding in MULTI_CONV_STEMS[patch]:
        side = (side + 2 * padding - kernel) // stride + 1
    return side


class PatchEmbed(NotScriptable, nn.Module):
    """Image to patch tokens: one strided conv, or timm's three-conv stem (``multi_conv``).

    Takes images of ``img_size`` only, unless ``strict_img_size`` is False (a model with
    ``dynamic_img_size``, whose branch sizes follow each input's)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, multi_conv=False,
                 strict_img_size: bool = True, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        img_size = _pair(img_size)
        patch_size = _pair(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        # the tokens the stem makes (patches_along also refuses a stem timm has no design for)
        self.grid_size = tuple(patches_along(s, p, multi_conv) for s, p in zip(img_size, patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        if multi_conv:
            widths = (in_chans, embed_dim // 4, embed_dim // 2, embed_dim)
            stem = []
            for i, (kernel, stride, padding) in enumerate(MULTI_CONV_STEMS[patch_size[0]]):
                stem += [nn.ReLU(inplace=True)] if i else []
                stem.append(nn.Conv2d(widths[i], widths[i + 1], kernel_size=kernel, stride=stride,
                                      padding=padding, **dd))
            self.proj = nn.Sequential(*stem)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, **dd)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        if self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ValueError(f"PatchEmbed: input image size ({H}*{W}) doesn't match model "
                             f"({self.img_size[0]}*{self.img_size[1]})")
        if _patchify_conv(self.proj) and x.ndim == 4 and x.shape[1] == self.proj.in_channels:
            return patchify_linear(x, self.proj)
        return self.proj(x).flatten(2).transpose(1, 2)


def _patchify_conv(conv: nn.Module) -> bool:
    """A plain Conv2d whose kernel tiles the image (stride = kernel, no padding, dilation or
    groups), without hooks or a compiled forward of its own: a Linear over the patches."""
    return (type(conv) is nn.Conv2d and conv.stride == conv.kernel_size
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and _runs_as_written(conv) and not reference.naive_enabled())


def patchify_linear(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x).flatten(2).transpose(1, 2)`` for a patch-tiling conv, as one copy that cuts
    the image into patch rows (cast to the autocast dtype on the way) and one GEMM.

    The GEMM is the conv's own math (same weights, same sums); it replaces cuDNN's implicit-GEMM
    conv and its NCHW-to-NHWC conversion, which at batch 256 took ~1 ms a branch on an H100
    (scripts/profile_model.py). Rows and columns past the last whole patch are dropped, as the
    strided conv drops them.
    """
    B, C, H, W = x.shape
    ph, pw = conv.kernel_size
    gh, gw = H // ph, W // pw
    cast = autocast_dtype(x.device.type)
    patches = x[:, :, :gh * ph, :gw * pw].reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    if cast is not None and x.dtype != cast and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        patches = patches.to(cast, memory_format=torch.contiguous_format)
    else:   # no cast recorded: a jit.trace replays no conversion of another input dtype
        patches = patches.contiguous()
    patches = patches.reshape(B, gh * gw, C * ph * pw)
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def _head_count(module: str, dim, num_heads) -> int:
    """``num_heads`` as a Python int dividing ``dim``: an integer of any kind (a NumPy integer
    from an array of per-branch counts, as timm takes) is accepted; the fused ops need an int."""
    try:
        heads = operator.index(num_heads)
    except TypeError:
        raise TypeError(f"{module}: num_heads must be an integer, got {num_heads!r}") from None
    if heads <= 0 or dim % heads:
        raise ValueError(f"{module}: dim ({dim}) must be divisible by num_heads ({num_heads})")
    return heads


class Attention(nn.Module):
    """Multi-head self-attention of the branch blocks (timm's ``Attention``).

    As timm's: through SDPA where ``fused_attn`` (default :func:`use_fused_attn`), else with
    the attention matrix formed and passed to ``attn_drop`` (where hooks can read it).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_heads = _head_count("Attention", dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.attn_dim = dim
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.gate = None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """``attn_mask`` (boolean: True attends; or added to the scores) and ``is_causal`` as in
        timm's ``Attention`` and SDPA; CrossViT passes neither."""
        B, N, C = x.shape
        # q, k, v: the [B, H, N, D] views of timm's permute (same strides, same SDPA call), taken
        # as unbind(2) then transpose: their gradients then stack straight into qkv's layout,
        # where timm's permute(2, 0, 3, 1, 4).unbind(0) stacks them and copies once more.
        q, k, v = (t.transpose(1, 2) for t in
                   self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2))
        q, k = self.q_norm(q), self.k_norm(k)
        branch_maps = _recording()[1]
        if self.fused_attn and not branch_maps:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:  # timm's non-fused path, recording the maps for forward_attention_maps
            attn = (q * self.scale) @ k.transpose(-2, -1)
            bias = _attention_bias(N, attn, attn_mask, is_causal)
            attn = (attn if bias is None else attn + bias).softmax(dim=-1)
            x = _recording_attn_drop(self.attn_drop, branch_maps)(attn) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))


def _attention_bias(n: int, scores: Tensor, attn_mask: Optional[Tensor], is_causal: bool
                    ) -> Optional[Tensor]:
    """What SDPA adds to the ``[.., n, n]`` scores for ``attn_mask`` / ``is_causal`` (timm's
    ``resolve_self_attn_mask``): ``-inf`` above the diagonal where causal (it wins over a mask),
    ``-inf`` where a boolean mask is False, a float mask as it is."""
    if is_causal:
        return scores.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


class Mlp(nn.Module):
    """fc1 → GELU → fc2 (timm's ``Mlp``)."""

    def __init__(self, in_features, hidden_features=None, act_layer=nn.GELU, drop=0.,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(NotScriptable, nn.Module):
    """Pre-norm ViT block (timm's ``Block``); ``x + attn`` and ``norm2`` run as one fused op, and
    under autocast both norms write the autocast dtype their Linear would cast to."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, proj_drop=0., attn_drop=0.,
                 drop_path=0., act_layer: Type[nn.Module] = nn.GELU,
                 norm_layer: Optional[Type[nn.Module]] = None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or functools.partial(LayerNorm, eps=1e-6)   # timm's Block default
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop, **dd)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        y, _ = add_and_norm(self.norm1, x, None)
        # without a mask, attn is called on y alone: a replaced attn need not take timm's arguments
        attn = (self.attn(y) if attn_mask is None and not is_causal
                else self.attn(y, attn_mask=attn_mask, is_causal=is_causal))
        y, x = add_and_norm(self.norm2, self.drop_path1(self.ls1(attn)), x)
        return x + self.drop_path2(self.ls2(self.mlp(y)))



class BlockChain(NotScriptable, nn.Sequential):
    """A branch's run of :class:`Block` s (timm's ``nn.Sequential``, same keys), with each
    block's closing residual add fused into the next block's ``norm1``: one pass over the
    tokens fewer per block boundary. A run with any other module, or a block with hooks or
    compiled on its own, runs block by block as ``nn.Sequential`` does."""

    def forward(self, x: Tensor) -> Tensor:
        blocks = list(self)
        # only plain Blocks that run as written may be taken apart without skipping something
        if not blocks or not all(type(b) is Block for b in blocks) or not _runs_as_written(*blocks):
            return super().forward(x)
        y, _ = add_and_norm(blocks[0].norm1, x, None)
        for i, block in enumerate(blocks):
            y, x = add_and_norm(block.norm2, block.drop_path1(block.ls1(block.attn(y))), x)
            mlp_out = block.drop_path2(block.ls2(block.mlp(y)))
            if i + 1 < len(blocks):
                y, x = add_and_norm(blocks[i + 1].norm1, mlp_out, x)
        return x + mlp_out


class ClsProjection(NotScriptable, nn.Sequential):
    """timm's ``Sequential(norm, GELU, Linear)`` CLS projection, fused into one op where
    :data:`FUSED_CLS_PROJECTION` is set (by default it runs as timm's modules: faster at these
    sizes).

    Children stay ``0`` (LayerNorm), ``1`` (GELU), ``2`` (Linear) so keys are ``projs.i.{0,2}``.
    """

    def _fusable(self) -> bool:
        return FUSED_CLS_PROJECTION and self.fused_math_applies()

    def fused_math_applies(self) -> bool:
        """Whether a fused kernel may compute this projection from its parameters: timm's
        LayerNorm, exact GELU and Linear with a bias, none of them hooked or replaced."""
        if len(self) != 3:
            return False
        norm, act, linear = self
        return (_fusable_norm(norm) and type(act) is nn.GELU and act.approximate == "none"
                and type(linear) is nn.Linear and linear.bias is not None
                and _runs_as_written(act, linear))

    def forward(self, x: Tensor) -> Tensor:
        if self._fusable():
            norm, _, linear = self
            return ops.cls_projection(x, norm.weight, norm.bias, linear.weight, linear.bias, norm.eps)
        return super().forward(x)


class CrossAttention(NotScriptable, nn.Module):
    """timm's ``CrossAttention``: token 0 queries all tokens (naive math, K and V formed)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = _head_count("CrossAttention", dim, num_heads)
        self.scale = (dim // self.num_heads) ** -0.5
        self.wq = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        attn_drop = _recording_attn_drop(self.attn_drop, True, at_least_fp32=True)
        out = reference.cross_attention(x, self.wq, self.wk, self.wv, self.proj, self.num_heads,
                                        self.scale, attn_drop=attn_drop)
        return self.proj_drop(out)


class CrossAttentionBlock(NotScriptable, nn.Module):
    """timm's ``CrossAttentionBlock``: ``cls + drop_path(attn(norm1([cls ‖ patches])))``.

    ``forward(cls, patches)`` takes the CLS token ``[B, 1, C]`` and the other branch's patch view
    separately and runs the fused op (no concatenation, no K or V); ``forward(x)`` also accepts
    timm's concatenated ``[B, 1 + N, C]`` tokens. Returns the new CLS token ``[B, 1, C]``.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, proj_drop=0., attn_drop=0.,
                 drop_path=0., act_layer: Type[nn.Module] = nn.GELU,
                 norm_layer: Type[nn.Module] = LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                   attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _fusable(self) -> bool:
        """The fused op reads norm1's and the four Linears' parameters itself: only where those
        are plain modules (not wrapped, quantized or hooked) and no dropout acts inside. It
        never calls ``attn_drop``: where that is hooked or replaced (to read the attention
        maps, as timm's ``AttentionExtract`` does), timm's math runs and calls it."""
        attn = self.attn
        if (type(attn) is not CrossAttention or type(attn.attn_drop) is not nn.Dropout
                or type(attn.proj_drop) is not nn.Dropout
                or type(self.drop_path) not in (nn.Identity, DropPath)):
            return False
        linears = (attn.wq, attn.wk, attn.wv, attn.proj)
        dropout_active = self.training and (attn.attn_drop.p > 0 or attn.proj_drop.p > 0)
        return (_fusable_norm(self.norm1) and not dropout_active
                and all(type(m) is nn.Linear for m in linears)
                and _runs_as_written(attn, attn.attn_drop, attn.proj_drop, self.drop_path, *linears))

    def forward(self, x: Tensor, patches: Optional[Tensor] = None) -> Tensor:
        cls, patches = (x[:, 0:1], x[:, 1:]) if patches is None else (x, patches)
        if cls.dtype != patches.dtype:
            # timm concatenates the two, which promotes: under autocast a bf16 projected CLS
            # token meets the fp32 patch tokens and attends (and is added back) in fp32
            dtype = torch.promote_types(cls.dtype, patches.dtype)
            cls, patches = cls.to(dtype), patches.to(dtype)
        if not self._fusable():
            tokens = torch.cat((cls, patches), dim=1)
            return cls + self.drop_path(self.attn(self.norm1(tokens)))
        stochastic_depth = self.training and isinstance(self.drop_path, DropPath) and self.drop_path.drop_prob > 0
        attn = self.attn
        maps = _recording()[0]
        if maps is not None:
            maps[attn.attn_drop] = ops.cls_attention_maps(
                cls, patches, self.norm1.weight, self.norm1.bias, attn.wq.weight, attn.wq.bias,
                attn.wk.weight, attn.num_heads, attn.scale, self.norm1.eps)
        out = ops.cls_cross_attention(
            cls, patches, self.norm1.weight, self.norm1.bias, attn.wq.weight, attn.wq.bias,
            attn.wk.weight, attn.wk.bias, attn.wv.weight, attn.wv.bias, attn.proj.weight,
            attn.proj.bias, attn.num_heads, attn.scale, self.norm1.eps,
            add_residual=not stochastic_depth)
        return cls + self.drop_path(out) if stochastic_depth else out


def _is_listlike(v) -> bool:
    """Any iterable but a string (a list, a tuple, a NumPy array), as timm's ``to_2tuple`` tells."""
    return isinstance(v, Iterable) and not isinstance(v, str)


def _pair(v) -> tuple:
    """``v`` as a tuple: a list-like as it is, anything else twice, as timm's ``to_2tuple``."""
    return tuple(v) if _is_listlike(v) else (v, v)
