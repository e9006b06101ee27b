"""crossvit-fast: a drop-in, fused-kernel CrossViT (timm-compatible).

    import crossvit_fast
    model = crossvit_fast.create_model("crossvit_18_240", pretrained=True)

The fused ops run on Triton (CUDA tensors), the CUDA C++ extension, or PyTorch (everywhere);
choose with :func:`set_backend`, :func:`use_backend` or ``CROSSVIT_FAST_BACKEND``.

Importing the package does not import torch: each name below loads its module (and torch, and
the fused ops) on first use, so that ``crossvit-fast --help`` and argument errors come back at
once. Code that needs the ``crossvit_fast::`` ops registered without touching a name (e.g. to
load a trace that records them) imports :mod:`crossvit_fast.ops`.
"""
import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "BackendUnavailableError": "backends", "get_backend": "backends", "set_backend": "backends",
    "use_backend": "backends", "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint",
    "GraphedInference": "cuda_graphs", "CrossViT": "model", "create_model": "variants",
    "list_models": "variants",
}
_SUBMODULES = ("attention_viz", "backends", "benchmarking", "branch_streams", "checkpoint", "cli",
               "commands", "cuda_graphs", "examples", "features", "fused_exchange", "kernels",
               "layers", "model", "ops", "reference", "resolution", "variants", "weight_init")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """A public name or submodule, imported on first use (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
