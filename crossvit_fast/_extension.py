"""Builds and loads the CUDA C++ extension (``csrc/``) that the ``cuda`` backend runs.

:func:`load_extension` compiles ``csrc/*.cu`` and ``csrc/bindings.cpp`` with
:func:`torch.utils.cpp_extension.load` (ninja) on first use and loads the library, which registers
the ops ``torch.ops.crossvit_fast_cuda.*``. Code is generated for the architectures torch picks:
``TORCH_CUDA_ARCH_LIST`` if set, else those of the visible GPUs. torch keeps the build in its
extensions directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and
rebuilds only when the sources or flags change, so later processes just load it.

With no visible GPU (a container's build step) ``TORCH_CUDA_ARCH_LIST`` must be set. Before
torch 2.14 a build lock left by a killed build made every later load wait forever: it is named
instead. From 2.14 torch holds an OS lock, which a killed build releases, on a file that stays.

A failed build never raises from :func:`load_extension`: it warns once, with the compiler's
message, and returns the reason, which marks the ``cuda`` backend unavailable.
:func:`build_extension` (``crossvit-fast build-ext``) builds ahead of time and raises on failure.

The C++ standard is left to torch (C++20 for torch >= 2.10, whose headers need it); the kernels
themselves also compile as C++17. No ``--use_fast_math``: GELU's ``erff`` and the softmax's
``expf`` stay accurate.
"""
from __future__ import annotations

import functools
import importlib.resources
import os
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

NAME = "crossvit_fast_cuda"
_REASON_CHARS = 2000  # the tail of a compiler message kept in the reason (the warning has it all)
# torch's build lock older than this was left by a killed build (a build takes minutes)
STALE_LOCK_S = 1800


def sources() -> List[Path]:
    """The extension's translation units: every ``csrc/*.cu`` and ``csrc/bindings.cpp``."""
    csrc = Path(str(importlib.resources.files("crossvit_fast.csrc")))
    return sorted(csrc.glob("*.cu")) + [csrc / "bindings.cpp"]


def build_extension(verbose: bool = True) -> None:
    """Build (if not up to date) and load the extension; raises RuntimeError if that fails."""
    if torch.version.cuda is None:
        raise RuntimeError(f"this torch ({torch.__version__}) was built without CUDA; "
                           "the CUDA extension needs a CUDA build of torch")
    from torch.utils import cpp_extension  # imported late: it is slow and only needed here

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list and torch.cuda.device_count() == 0:
        raise RuntimeError("no visible GPU to build the CUDA extension for: set TORCH_CUDA_ARCH_LIST "
                           "to the compute capabilities to build for, e.g. TORCH_CUDA_ARCH_LIST='8.0;8.6;9.0'")
    lock = Path(cpp_extension._get_build_directory(NAME, verbose=False)) / "lock"
    if _lock_file_blocks(cpp_extension):
        _check_build_lock_file(lock)
    else:
        _warn_if_build_lock_held(lock)
    try:
        cpp_extension.load(name=NAME, sources=[str(p) for p in sources()],
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                           with_cuda=True, is_python_module=False, verbose=verbose)
    except ValueError as err:   # torch's reading of the architecture list
        if not arch_list:
            raise
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: {err}; expected compute "
                           f"capabilities separated by ';', e.g. '8.0;9.0+PTX'") from err


def _lock_file_blocks(cpp_extension) -> bool:
    """Whether this torch waits while its lock *file* exists (``FileBaton``, torch < 2.14),
    rather than on an OS advisory lock held on it (``FileLock``, torch >= 2.14: the file stays
    after every build, and the kernel releases a killed build's lock)."""
    return not hasattr(cpp_extension, "FileLock")


def _check_build_lock_file(lock: Path) -> None:
    """torch's lock file ``lock``, which makes ``load`` wait, silently, until it is gone: a
    RuntimeError naming it where it is older than :data:`STALE_LOCK_S` (a killed build left
    it), else a warning that this process waits on another's build."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        raise RuntimeError(f"{lock} is {age / 60:.0f} minutes old: a build of the CUDA extension was "
                           f"killed and left it; delete it (no build is that long) and try again")
    _warn_waiting(f"{lock} exists; if no build is running, delete it")


def _warn_if_build_lock_held(lock: Path) -> None:
    """A warning that this process waits, where another process holds torch's OS lock on
    ``lock`` (its build is running); the file itself means nothing."""
    import filelock  # torch's own dependency, whose lock torch >= 2.14 takes

    if not lock.exists():
        return
    try:
        with filelock.FileLock(str(lock), timeout=0):
            return
    except filelock.Timeout:
        _warn_waiting(f"another process holds the lock on {lock}")


def _warn_waiting(why: str) -> None:
    warnings.warn(f"crossvit_fast: waiting for another process's build of the CUDA extension to "
                  f"end ({why})", RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def load_extension() -> Optional[str]:
    """Build and load the extension once per process: ``None`` on success, else why not.

    A failure warns once (RuntimeWarning with the full compiler output); the returned reason
    ends with the tail of that output.
    """
    try:
        build_extension(verbose=False)
    except Exception as err:  # compiler, ninja, loader or toolkit lookup: all mean "unavailable"
        message = str(err).strip() or type(err).__name__
        warnings.warn(f"crossvit_fast: the CUDA extension could not be built: {message}",
                      RuntimeWarning, stacklevel=2)
        tail = message if len(message) <= _REASON_CHARS else "..." + message[-_REASON_CHARS:]
        return f"the CUDA extension could not be built: {tail}"
    return None
