"""The fused ops behind the drop-in modules, each an autograd-aware ``torch.library`` custom op.

Their backend is chosen per call (``backend=``), per context (``crossvit_fast.use_backend``) or
globally (``crossvit_fast.set_backend`` / ``CROSSVIT_FAST_BACKEND``).
"""
from .attention_maps import cls_attention_maps
from .cls_projection import cls_projection
from .cross_attention import cls_cross_attention
from .layer_norm import add_layer_norm, layer_norm

__all__ = ["add_layer_norm", "cls_attention_maps", "cls_cross_attention", "cls_projection",
           "layer_norm"]
