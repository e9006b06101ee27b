"""The Triton backend: the seven primitives of :mod:`.torch_backend`, run by the kernels in
:mod:`crossvit_fast.kernels` (same signatures, same output dtypes).

Triton runs CUDA tensors compiled, and CPU tensors only in its interpreter (``TRITON_INTERPRET=1``
set before Triton is first imported), which is how the tests exercise it on machines without a GPU.

The six primitives of the fused ops take ``launch``: how each kernel is launched. Eager calls
launch at once; :data:`TRACED` holds the same primitives launched through ``wrap_triton``, for the bodies of the
``triton_op`` s that ``torch.compile`` decomposes into the kernel launches themselves (see
:mod:`crossvit_fast.ops`).
"""
from __future__ import annotations

import functools
import os
import types
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from . import torch_backend

try:
    import triton  # noqa: F401
except ImportError:  # the registry asks unavailable_reason; the primitives are never called
    triton = None
else:
    from triton.runtime.errors import OutOfResources

    from ..kernels import _launch, attn_pool, cls_proj, layer_norm
    from ..kernels import attn_weights as attn_weights_kernels
    from ..kernels._launch import direct

# (C, heads, dtype, dot dtype) of the cross-attention shapes whose Triton kernels did not fit
# the GPU: they go straight to torch after the first failure instead of failing (and warning)
# again on every call. Forward and backward share the entry, so that a backward never
# recomputes with Triton's products the scores of a forward that ran in torch, or the reverse
# (the two differ by the dot dtype's rounding under autocast).
_does_not_fit: set = set()
# The keys whose kernels were tried once on a real sample for torch.compile (see _probe_fit).
_probed: set = set()


def unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` where the kernels can run on ``device``, else why not."""
    device = torch.device(device)
    if triton is None:
        return "Triton is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device and TRITON_INTERPRET is not set (Triton runs CPU tensors only in its interpreter)"
        if not _launch.INTERPRET:
            return "TRITON_INTERPRET was set after the Triton kernels were imported; set it before importing Triton"
        return None
    return f"Triton does not run on {device.type} tensors"


def recordable() -> bool:
    """Whether ``torch.compile`` can record the kernels' launches (:data:`TRACED`): where
    Triton compiles them, not where its CPU interpreter runs them."""
    return triton is not None and not _launch.INTERPRET


def _torch_when_out_of_resources(what: str, key: tuple, kernel_call, torch_call):
    """``kernel_call()``; if Triton cannot fit the kernel on this GPU (shared memory or
    registers for very wide rows), warn once for ``key`` and run ``torch_call()`` from then on."""
    if key in _does_not_fit:
        return torch_call()
    try:
        return kernel_call()
    except OutOfResources as err:
        _does_not_fit.add(key)
        C, H, dtype, _ = key
        warnings.warn(f"crossvit_fast: the Triton {what} kernel (C={C}, {H} heads, {dtype}) does not "
                      f"fit this GPU ({err}); the PyTorch backend runs the cross-attention's token "
                      f"pass at this shape instead (slower, same results)", RuntimeWarning, stacklevel=3)
        return torch_call()


def _fit_key(x0: Tensor, kt: Tensor, dot_dtype: Optional[torch.dtype]) -> tuple:
    """What decides whether the cross-attention kernels fit: width, heads and dtypes. Plain
    ints: under the compiler with dynamic shapes the sizes are SymInts, which do not hash."""
    return int(x0.shape[-1]), int(kt.shape[1]), x0.dtype, dot_dtype


def _may_run_out_of_resources(device: torch.device) -> bool:
    """A GPU's shared memory and registers can be too few for a kernel; the interpreter's never."""
    return device.type == "cuda"


def _probe_fit(key: tuple, device: torch.device) -> None:
    """Under ``torch.compile`` a launch is only recorded: inductor compiles the kernel after the
    trace, where an ``OutOfResources`` can no longer fall back, and the compile would fail. So,
    once per key, the eager kernels run forward and backward on one real sample of that width
    (the fit depends on width, heads and dtypes, not on batch or tokens), outside the tracing
    modes: a kernel that does not fit puts the key in ``_does_not_fit``, and the trace then
    takes the PyTorch backend."""
    if key in _probed or key in _does_not_fit or not _may_run_out_of_resources(device):
        return
    C, H, dtype, dot_dtype = key
    with _disable_current_modes(), torch.no_grad():
        x0 = torch.randn(1, C, dtype=dtype, device=device)
        patches = torch.randn(1, 1, C, dtype=dtype, device=device)
        kt, dz = torch.randn(1, H, C, device=device), torch.randn(1, H, C, device=device)
        gamma, beta = torch.ones(C, device=device), torch.zeros(C, device=device)
        z, lse = attn_pool_fwd(x0, patches, kt, gamma, beta, 1e-6, dot_dtype)
        attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z, lse, 1e-6, dot_dtype)
    _probed.add(key)


def attn_pool_fwd(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                  eps: float, dot_dtype: Optional[torch.dtype] = None, launch=None
                  ) -> Tuple[Tensor, Tensor]:
    if launch is not None:      # recorded for the compiler: it must fit when inductor compiles it
        _probe_fit(_fit_key(x0, kt, dot_dtype), x0.device)
    return _torch_when_out_of_resources(
        "cross-attention forward", _fit_key(x0, kt, dot_dtype),
        lambda: attn_pool.attn_pool_fwd(x0, patches, kt, gamma, beta, eps, dot_dtype,
                                        launch=launch or direct),
        lambda: torch_backend.attn_pool_fwd(x0, patches, kt, gamma, beta, eps))


def attn_pool_bwd(dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                  beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                  dot_dtype: Optional[torch.dtype] = None, launch=None
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if launch is not None:      # recorded for the compiler: it must fit when inductor compiles it
        _probe_fit(_fit_key(x0, kt, dot_dtype), x0.device)
    return _torch_when_out_of_resources(
        "cross-attention backward", _fit_key(x0, kt, dot_dtype),
        lambda: attn_pool.attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z, lse, eps, dot_dtype,
                                        launch=launch or direct),
        lambda: torch_backend.attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z, lse, eps))


def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                   eps: float, out_dtype: Optional[torch.dtype] = None, launch=None
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm.layer_norm_fwd(x, residual, weight, bias, eps, out_dtype, launch or direct)


def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor, launch=None) -> Tuple[Tensor, Tensor, Tensor]:
    return layer_norm.layer_norm_bwd(dy, dh, h, weight, mean, rstd, launch or direct)


def cls_proj_fwd(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                 eps: float, launch=None) -> Tuple[Tensor, Tensor, Tensor]:
    return cls_proj.cls_proj_fwd(x, ln_weight, ln_bias, weight, bias, eps, launch or direct)


def cls_proj_bwd(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor,
                 mean: Tensor, rstd: Tensor, launch=None
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return cls_proj.cls_proj_bwd(dy, x, ln_weight, ln_bias, weight, mean, rstd, launch or direct)


def attn_weights(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                 lse: Tensor, eps: float, dot_dtype: Optional[torch.dtype] = None) -> Tensor:
    # the forward's key: where its kernel did not fit, the torch backend made lse, so it makes
    # the maps too (same scores, rows that sum to 1)
    return _torch_when_out_of_resources(
        "cross-attention maps", (x0.shape[-1], kt.shape[1], x0.dtype, dot_dtype),
        lambda: attn_weights_kernels.attn_weights(x0, patches, kt, gamma, beta, lse, eps, dot_dtype),
        lambda: torch_backend.attn_weights(x0, patches, kt, gamma, beta, lse, eps))


def _traced_primitives() -> Optional[types.SimpleNamespace]:
    """The six primitives of the fused ops with every kernel launched through ``wrap_triton``
    (see ``kernels._launch.traced``); None where Triton is missing. ``attn_weights`` is not
    among them: no compiled op calls it."""
    if triton is None:
        return None
    primitives = (attn_pool_fwd, attn_pool_bwd, layer_norm_fwd, layer_norm_bwd, cls_proj_fwd,
                  cls_proj_bwd)
    return types.SimpleNamespace(**{f.__name__: functools.partial(f, launch=_launch.traced)
                                    for f in primitives})


TRACED = _traced_primitives()
