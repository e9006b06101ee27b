"""Loading CrossViT checkpoints: timm's key style, the official IBM style, and the Hub.

The official IBM checkpoints name two parameters ``pos_embed.0`` / ``cls_token.0`` where timm has
``pos_embed_0`` / ``cls_token_0``; DDP checkpoints prefix keys with ``module.``; training scripts
wrap the weights in ``{"model": ...}`` or ``{"state_dict": ...}``. All of these load.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the offending keys."""


def read_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file, wrappers removed.

    Pickle files are read with ``torch.load(weights_only=True)``: no code in them runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path), device="cpu")
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"checkpoint_path: expected a .safetensors, .pth, .pt or .bin file, got {path.name!r}")
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors "
                              f"(optionally under {' or '.join(repr(k) for k in _WRAPPER_KEYS)})")
    return dict(state)


def to_timm_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename IBM-style (``pos_embed.0``) and DDP (``module.``) keys to timm's names."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith(("pos_embed.", "cls_token.")):
            key = key.replace(".", "_")
        out[key] = value
    return out


def _describe(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mis_shaped = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches: {_describe(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(problems))


def load_checkpoint(model: nn.Module, path: str | os.PathLike, drop_head: bool = False) -> None:
    """Load ``path`` into ``model`` strictly (every key and shape must match).

    ``drop_head=True`` keeps the model's own classifier (``head.*``), as timm does when a
    pretrained model is built with another ``num_classes``.
    """
    state = to_timm_keys(read_state_dict(path))
    if drop_head:
        own_head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update(own_head)
    check_state_dict(model, state, f"checkpoint {path}")
    model.load_state_dict(state, strict=True)


def pretrained_path(name: str, cache_dir: Optional[str | os.PathLike] = None) -> str:
    """Local path of timm's published ``model.safetensors`` for variant ``name``.

    The local Hugging Face cache is tried first (no network); then the Hub itself.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise RuntimeError("pretrained=True needs huggingface_hub; pip install huggingface_hub, "
                           "or pass checkpoint_path=") from err
    repo = f"timm/{name}.in1k"
    try:
        return hf_hub_download(repo, "model.safetensors", cache_dir=cache_dir, local_files_only=True)
    except Exception:  # not cached: ask the Hub
        pass
    try:
        return hf_hub_download(repo, "model.safetensors", cache_dir=cache_dir)
    except Exception as err:
        raise RuntimeError(
            f"could not fetch pretrained weights for {name} from the Hugging Face Hub ({repo}): "
            f"{type(err).__name__}: {err}. Without network access, download model.safetensors "
            f"from https://huggingface.co/{repo} on another machine and pass checkpoint_path=") from err
