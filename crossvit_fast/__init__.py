"""crossvit-fast: a drop-in, fused-kernel CrossViT (timm-compatible).

    import crossvit_fast
    model = crossvit_fast.create_model("crossvit_18_240", pretrained=True)

The fused ops run on Triton (CUDA tensors), the CUDA C++ extension, or PyTorch (everywhere);
choose with :func:`set_backend`, :func:`use_backend` or ``CROSSVIT_FAST_BACKEND``.
"""
from .backends import BackendUnavailableError, get_backend, set_backend, use_backend
from .checkpoint import CheckpointError, load_checkpoint
from .cuda_graphs import GraphedInference
from .model import CrossViT
from .variants import create_model, list_models

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "CheckpointError", "CrossViT", "GraphedInference", "create_model",
           "get_backend", "list_models", "load_checkpoint", "set_backend", "use_backend"]
