"""The CUDA C++ backend: the seven primitives of :mod:`.torch_backend`, run by the kernels in
``csrc/`` (ops ``torch.ops.crossvit_fast_cuda.*``, built on first use by
:mod:`crossvit_fast._extension`). Same signatures and output dtypes as the torch backend.

Two differences of the C++ ops are absorbed here:

* ``layer_norm_fwd`` without a residual: the op returns an empty ``h`` (an op output may not
  alias its input), while the torch backend returns ``x`` itself as ``h``; so does this one.
* float64 activations are not taken by the kernels: those calls (the tests' reference precision)
  run the torch backend instead, on the same device.

The token-pass kernels (the cross-attention and its maps) also have limits: a width C of at most
1024, at most 16 heads, and the shared memory a block needs at that width within what the GPU
grants (crossvit_base's C = 768 with 12 heads needs 92 KiB: more than a Turing GPU's 64 KiB). A
shape beyond them runs the torch backend, on the same device, with a warning once per shape.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import torch_backend
from .._extension import load_extension


def unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` where the extension runs on ``device``; else why not (builds it on first call)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "needs a CUDA device; torch.cuda.is_available() is False"
    return load_extension()


def _ops():
    return torch.ops.crossvit_fast_cuda


@functools.lru_cache(maxsize=None)
def token_pass_unsupported(C: int, H: int, device_index: int) -> Optional[str]:
    """Why the token-pass kernels cannot take width ``C`` with ``H`` heads on CUDA device
    ``device_index``, or ``None`` where they can (the limits come from the extension)."""
    max_c, max_h, fwd_bytes, bwd_bytes, limit = _ops().attn_pool_limits(C, H, device_index)
    if C > max_c:
        return f"the width C = {C} is more than the {max_c} they take"
    if H > max_h:
        return f"H = {H} heads are more than the {max_h} they take"
    need = max(fwd_bytes, bwd_bytes)
    if need > limit:
        name = torch.cuda.get_device_name(device_index)
        return (f"C = {C} with H = {H} heads needs {need} bytes of shared memory per block "
                f"and {name} allows {limit}")
    return None


@functools.lru_cache(maxsize=None)
def _warn_token_pass_on_torch(reason: str) -> None:
    warnings.warn(f"crossvit_fast: the CUDA backend's cross-attention kernels cannot run this "
                  f"shape ({reason}); it runs on the torch backend instead, slower. The triton "
                  f"backend (compute capability 8.0 and newer) takes every shape.",
                  RuntimeWarning, stacklevel=3)


def _token_pass_on_torch(dtype: torch.dtype, device: torch.device, C: int, H: int) -> bool:
    """Whether a token-pass call on ``[.., C]`` rows with ``H`` heads runs the torch backend:
    float64 (the tests' reference precision, silently) or a shape beyond the kernels' limits on
    this GPU (with a warning, once per shape). Rows off the GPU go to the op, which names them."""
    if dtype == torch.float64:
        return True
    if device.type != "cuda":
        return False
    reason = token_pass_unsupported(C, H, device.index)
    if reason is not None:
        _warn_token_pass_on_torch(reason)
    return reason is not None


def _rows(t: Tensor) -> Tensor:
    """``t`` with unit stride along its last dim, as the kernels read it: a CLS token stored
    column-major, patches given as a transposed view, or a gradient arriving as a broadcast view
    (the backward of ``.sum()`` has stride 0), is copied."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def attn_pool_fwd(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                  eps: float, dot_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """See :func:`.torch_backend.attn_pool_fwd`; computes in fp32 whatever ``dot_dtype``."""
    if _token_pass_on_torch(x0.dtype, x0.device, x0.shape[-1], kt.shape[1]):
        return torch_backend.attn_pool_fwd(x0, patches, kt, gamma, beta, eps)
    return _ops().attn_pool_fwd(_rows(x0), _rows(patches), kt, gamma, beta, eps)


def attn_pool_bwd(dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                  beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                  dot_dtype: Optional[torch.dtype] = None
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.torch_backend.attn_pool_bwd`."""
    if _token_pass_on_torch(x0.dtype, x0.device, x0.shape[-1], kt.shape[1]):
        return torch_backend.attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z, lse, eps)
    return _ops().attn_pool_bwd(dz, _rows(x0), _rows(patches), kt, gamma, beta, z, lse, eps)


def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                   eps: float, out_dtype: Optional[torch.dtype] = None
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.torch_backend.layer_norm_fwd`; without a residual, ``h`` is ``x`` itself."""
    if x.dtype == torch.float64 or (residual is not None and residual.dtype == torch.float64):
        return torch_backend.layer_norm_fwd(x, residual, weight, bias, eps, out_dtype)
    if residual is not None and residual.dtype != x.dtype:   # the kernels take one dtype
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    x, residual = _rows(x), (None if residual is None else _rows(residual))
    # the kernels write fp32/fp16/bf16; a float64 y is the fp32 one widened (exactly)
    wide = out_dtype == torch.float64
    y, h, mean, rstd = _ops().layer_norm_fwd(x, residual, weight, bias, eps,
                                             torch.float32 if wide else out_dtype)
    return (y.double() if wide else y), (x if residual is None else h), mean, rstd


def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """See :func:`.torch_backend.layer_norm_bwd`."""
    if h.dtype == torch.float64:
        return torch_backend.layer_norm_bwd(dy, dh, h, weight, mean, rstd)
    # The kernels take gradients in the activation dtype. A gradient of another dtype (a 16-bit
    # norm whose output was written in fp32, or in the other 16-bit dtype) would lose range or
    # digits rounded to h's: those run in fp32, as the torch and Triton backends compute.
    if dy.dtype != h.dtype or (dh is not None and dh.dtype != h.dtype):
        work = torch.float32
        dh = None if dh is None else _rows(dh.to(work))
        dx, dweight, dbias = _ops().layer_norm_bwd(_rows(dy.to(work)), dh, h.to(work), weight, mean, rstd)
        return dx.to(h.dtype), dweight, dbias
    dh = None if dh is None else _rows(dh)
    return _ops().layer_norm_bwd(_rows(dy), dh, h, weight, mean, rstd)


def cls_proj_fwd(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                 eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """See :func:`.torch_backend.cls_proj_fwd`."""
    if x.dtype == torch.float64:
        return torch_backend.cls_proj_fwd(x, ln_weight, ln_bias, weight, bias, eps)
    return _ops().cls_proj_fwd(_rows(x), ln_weight, ln_bias, weight, bias, eps)


def cls_proj_bwd(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor,
                 mean: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`.torch_backend.cls_proj_bwd`."""
    if x.dtype == torch.float64:
        return torch_backend.cls_proj_bwd(dy, x, ln_weight, ln_bias, weight, mean, rstd)
    return _ops().cls_proj_bwd(_rows(dy.to(x.dtype)), x, ln_weight, ln_bias, weight, mean, rstd)


def attn_weights(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                 lse: Tensor, eps: float, dot_dtype: Optional[torch.dtype] = None) -> Tensor:
    """See :func:`.torch_backend.attn_weights`; computes in fp32 whatever ``dot_dtype``."""
    if _token_pass_on_torch(x0.dtype, x0.device, x0.shape[-1], kt.shape[1]):
        return torch_backend.attn_weights(x0, patches, kt, gamma, beta, lse, eps)
    return _ops().attn_weights(_rows(x0), _rows(patches), kt, gamma, beta, lse, eps)
