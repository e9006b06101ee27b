"""Which backend runs the fused ops: ``auto``, ``triton``, ``cuda`` or ``torch``.

Each backend is a module exposing the seven primitives of :mod:`.torch_backend` and
``unavailable_reason(device) -> Optional[str]`` (``None`` when it can run on that device).
The choice is made, in order of precedence, per call (``backend=`` on the functional ops), per
context (:func:`use_backend`), or globally (:func:`set_backend`, seeded from the
``CROSSVIT_FAST_BACKEND`` environment variable). ``auto`` picks Triton on CUDA tensors of a GPU
of compute capability 8.0 or newer, the CUDA extension where Triton cannot run (an older GPU, no
Triton), and PyTorch elsewhere.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
CONCRETE_BACKENDS = ("triton", "cuda", "torch")
ENV_VAR = "CROSSVIT_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def check_name(name: str, what: str) -> str:
    """``name`` lower-cased if it is a backend name; a ValueError naming ``what`` otherwise."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.lower()


# Seeded from the environment variable at import (see the end of this file) where it holds a valid
# name; a bad value leaves it unset, so that ``import crossvit_fast`` (and ``crossvit-fast info``,
# which reports it) works and the first choice of a backend raises.
_requested: Optional[str] = None


def _env_backend() -> str:
    """The backend that ``CROSSVIT_FAST_BACKEND`` requests (``auto`` when unset or empty); a
    ValueError naming the variable and the valid names when it holds something else."""
    return check_name(os.environ.get(ENV_VAR) or "auto", ENV_VAR)


def get_backend() -> str:
    """The backend requested now (``auto`` unless set by env var, :func:`set_backend` or context).

    The first call reads ``CROSSVIT_FAST_BACKEND``: a bad value raises its ValueError here, when a
    backend is first chosen, and on every call until a valid choice is made."""
    global _requested
    if _requested is None:
        _requested = _env_backend()
    return _requested


def set_backend(name: str) -> None:
    """Request a backend for every fused op from now on.

    A concrete backend that cannot run on any device here (e.g. ``triton`` without Triton)
    raises :class:`BackendUnavailableError` at once, with the reason.
    """
    global _requested
    name = check_name(name, "set_backend")
    if name != "auto":
        _raise_if_unusable_everywhere(name)
    _requested = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run fused ops on ``name`` inside the block, then restore the previous choice."""
    global _requested
    name = check_name(name, "use_backend")
    if name != "auto":
        _raise_if_unusable_everywhere(name)
    previous, _requested = _requested, name
    try:
        yield name
    finally:
        _requested = previous


def implementation(name: str) -> ModuleType:
    """The module implementing concrete backend ``name`` (imported on first use)."""
    if name not in CONCRETE_BACKENDS:
        raise ValueError(f"implementation: {name!r} is not a concrete backend ({CONCRETE_BACKENDS})")
    return importlib.import_module(f"{__name__}.{name}_backend")


def unavailable_reason(name: str, device: torch.device | str) -> Optional[str]:
    """Why concrete backend ``name`` cannot run on ``device``, or ``None`` if it can."""
    return _unavailable_reason(name, torch.device(device))


@functools.lru_cache(maxsize=None)
def _unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    # cached: availability does not change within a process (a failed build stays failed)
    try:
        module = implementation(name)
    except ImportError as err:  # e.g. Triton not installed
        return f"{name} backend could not be imported: {err}"
    return module.unavailable_reason(device)


def _raise_if_unusable_everywhere(name: str) -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    reasons = [unavailable_reason(name, d) for d in devices]
    if all(reasons):
        raise BackendUnavailableError(f"backend {name!r} is not available: {'; '.join(reasons)}")


def resolve(requested: Optional[str], device: torch.device | str) -> str:
    """The concrete backend that runs on ``device`` for a ``requested`` name (None: current choice)."""
    name = check_name(requested, "backend") if requested is not None else get_backend()
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if unavailable_reason(candidate, device) is None:
                    return candidate
        return "torch"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return name


def status() -> dict:
    """For each concrete backend and each device here: ``None`` if usable, else the reason."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {name: {d: unavailable_reason(name, d) for d in devices} for name in CONCRETE_BACKENDS}


# Seeded now, not by the first op: torch.compile would trace that seeding, guard on
# ``_requested is None`` and compile the whole model again on the next call.
try:
    _requested = _env_backend()
except ValueError:
    pass
