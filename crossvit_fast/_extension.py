"""Builds and loads the CUDA C++ extension (``csrc/``) that the ``cuda`` backend runs.

:func:`load_extension` compiles ``csrc/*.cu`` and ``csrc/bindings.cpp`` with
:func:`torch.utils.cpp_extension.load` (ninja) on first use and loads the library, which registers
the ops ``torch.ops.crossvit_fast_cuda.*``. Code is generated for the architectures torch picks:
``TORCH_CUDA_ARCH_LIST`` if set, else those of the visible GPUs. torch keeps the build in its
extensions directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and
rebuilds only when the sources or flags change, so later processes just load it.

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
import warnings
from pathlib import Path
from typing import List, Optional

import torch

NAME = "crossvit_fast_cuda"
_REASON_CHARS = 2000  # the tail of a compiler message kept in the reason (the warning has it all)


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
    cpp_extension.load(name=NAME, sources=[str(p) for p in sources()],
                       extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                       with_cuda=True, is_python_module=False, verbose=verbose)


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
