"""Helpers shared by the custom ops: backend dispatch, accumulation dtype, autocast isolation."""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from .. import backends


def backend_impl(requested: str, device: torch.device) -> ModuleType:
    """The module of the concrete backend that serves ``requested`` on ``device``."""
    return _impl_for(requested, device)


@functools.lru_cache(maxsize=None)
def _impl_for(requested: str, device: torch.device) -> ModuleType:
    # availability is fixed per process (backends caches it), so the answer can be cached too
    return backends.implementation(backends.resolve(requested, device))


def requested_backend(backend: Optional[str]) -> str:
    """The per-call choice if given, else the current global/context choice (validated)."""
    if backend is None:
        return backends.get_backend()
    return backends.check_name(backend, "backend")


def acc_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (the tests' reference precision); anything else accumulates in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def without_autocast(fn):
    """Run an op implementation with autocast off: it chooses its own precision per product."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = args[0].device.type
        if not torch.is_autocast_enabled(device_type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def cast_like(grad: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    """``grad`` in ``like``'s dtype, or None where there was no input to differentiate."""
    if like is None or grad is None:
        return None
    return grad.to(like.dtype)


def check_float_tensor(name: str, t: Tensor, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_same_device(op: str, **tensors: Optional[Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")


def check_vector(op: str, name: str, t: Optional[Tensor], size: int) -> None:
    if t is not None and tuple(t.shape) != (size,):
        raise ValueError(f"{op}: {name} must have shape ({size},), got {tuple(t.shape)}")
