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

import contextlib
import functools
import types
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

try:
    import triton  # noqa: F401
except ImportError:  # the registry asks unavailable_reason; the primitives are never called
    triton = None
else:
    from ..kernels import _launch, attn_pool, cls_proj, layer_norm
    from ..kernels import attn_weights as attn_weights_kernels
    from ..kernels._launch import direct, on_device_of

# The oldest GPU the kernels are built and checked for (bench.kernel_resources): the A100.
MIN_COMPUTE_CAPABILITY = (8, 0)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` where the kernels can run on ``device``, else why not."""
    device = torch.device(device)
    if triton is None:
        return "Triton is not installed"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_COMPUTE_CAPABILITY:
            return (f"the Triton kernels need an NVIDIA GPU of compute capability 8.0 (A100) or newer; "
                    f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
        return None
    if device.type == "cpu":
        if not triton.knobs.runtime.interpret:
            return "no CUDA device and TRITON_INTERPRET is not set (Triton runs CPU tensors only in its interpreter)"
        if not _launch.INTERPRET:
            return "TRITON_INTERPRET was set after the Triton kernels were imported; set it before importing Triton"
        return interpreter_numpy_conflict()
    return f"Triton does not run on {device.type} tensors"


def interpreter_numpy_conflict() -> Optional[str]:
    """Why this Triton's CPU interpreter cannot run with this numpy, or ``None``: Triton before
    3.7 converts one-element arrays to ints in a way numpy 2.4 refuses (a TypeError in every
    kernel that indexes with a loaded value)."""
    import numpy

    if TorchVersion(triton.__version__) < "3.7" and TorchVersion(numpy.__version__) >= "2.4":
        return (f"Triton {triton.__version__}'s CPU interpreter needs numpy below 2.4, and numpy "
                f"{numpy.__version__} is installed: pip install 'numpy<2.4' (or Triton 3.7 or newer)")
    return None


def _eager_on_device_of(t: Tensor, launch):
    """Eager launches (no ``launch`` given) on ``t``'s GPU whichever is current; launches the
    compiler records (``launch`` given) are placed by the compiled code's own device guard."""
    return on_device_of(t) if launch is None else contextlib.nullcontext()


def recordable() -> bool:
    """Whether ``torch.compile`` can record the kernels' launches (:data:`TRACED`): where
    Triton compiles them, not where its CPU interpreter runs them."""
    return triton is not None and not _launch.INTERPRET


def attn_pool_fwd(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                  eps: float, dot_dtype: Optional[torch.dtype] = None, launch=None
                  ) -> Tuple[Tensor, Tensor]:
    with _eager_on_device_of(x0, launch):
        return attn_pool.attn_pool_fwd(x0, patches, kt, gamma, beta, eps, dot_dtype,
                                       launch=launch or direct)


def attn_pool_bwd(dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                  beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                  dot_dtype: Optional[torch.dtype] = None, launch=None
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _eager_on_device_of(x0, launch):
        return attn_pool.attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z, lse, eps, dot_dtype,
                                       launch=launch or direct)


def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                   eps: float, out_dtype: Optional[torch.dtype] = None, launch=None
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with _eager_on_device_of(x, launch):
        return layer_norm.layer_norm_fwd(x, residual, weight, bias, eps, out_dtype, launch or direct)


def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor, launch=None) -> Tuple[Tensor, Tensor, Tensor]:
    with _eager_on_device_of(h, launch):
        return layer_norm.layer_norm_bwd(dy, dh, h, weight, mean, rstd, launch or direct)


def cls_proj_fwd(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                 eps: float, launch=None) -> Tuple[Tensor, Tensor, Tensor]:
    with _eager_on_device_of(x, launch):
        return cls_proj.cls_proj_fwd(x, ln_weight, ln_bias, weight, bias, eps, launch or direct)


def cls_proj_bwd(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor,
                 mean: Tensor, rstd: Tensor, launch=None
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _eager_on_device_of(x, launch):
        return cls_proj.cls_proj_bwd(dy, x, ln_weight, ln_bias, weight, mean, rstd,
                                     launch or direct)


def attn_weights(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                 lse: Tensor, eps: float, dot_dtype: Optional[torch.dtype] = None) -> Tensor:
    with on_device_of(x0):
        return attn_weights_kernels.attn_weights(x0, patches, kt, gamma, beta, lse, eps, dot_dtype)


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
