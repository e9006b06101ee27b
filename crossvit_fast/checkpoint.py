"""Loading CrossViT checkpoints: timm's key style, the official IBM style, and the Hub.

The official IBM checkpoints name two parameters ``pos_embed.0`` / ``cls_token.0`` where timm has
``pos_embed_0`` / ``cls_token_0``; DDP checkpoints prefix keys with ``module.``; training scripts
wrap the weights in ``{"model": ...}`` or ``{"state_dict": ...}`` (timm's train.py writes
``{"state_dict": ..., "state_dict_ema": ..., "args": Namespace(...)}`` to ``*.pth.tar``). All of
these load; as in timm, EMA weights are preferred where a checkpoint has them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
from safetensors import SafetensorError

from .resolution import resample_checkpoint_pos_embeds

_logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_EMA_KEYS = ("state_dict_ema", "model_ema")


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message, in plain text,
    names the file and what is wrong with it.

    A RuntimeError, as timm's ``load_checkpoint`` raises for an unreadable ``torch.save`` file and
    torch's ``load_state_dict`` for mismatched keys, so that handlers written for timm catch it
    too (and a ValueError, as before). Where timm raises another type, the subclass raised is
    that type too: :class:`CheckpointNotFoundError`, :class:`SafetensorsCheckpointError`,
    :class:`CheckpointDownloadError`."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint file at the path: a FileNotFoundError too, as timm raises there."""


class SafetensorsCheckpointError(CheckpointError, SafetensorError):
    """An unreadable ``.safetensors`` file: a SafetensorError too, as timm lets through there."""


class CheckpointDownloadError(CheckpointError, OSError):
    """Weights or a config that could not be fetched: an OSError too, as the errors of
    huggingface_hub and urllib that timm lets through are."""


def read_state_dict(path: str | os.PathLike, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file (told by its name or its first bytes) or a ``torch.save``
    file of any name (``.pth``, ``.pth.tar``, ``.ckpt``...), wrappers removed; the EMA weights
    where there are some and ``use_ema`` (timm's ``load_checkpoint`` default).

    Pickle files are read with ``torch.load(weights_only=True)``, ``argparse.Namespace`` (timm's
    saved ``args``) allowed: no code in them runs. Any failure is a :class:`CheckpointError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path}: {'not a file' if path.exists() else 'no such file'}")
    safetensors = path.suffix == ".safetensors" or _looks_like_safetensors(path)
    state = _read_safetensors(path) if safetensors else _read_pickle(path)
    keys = (_EMA_KEYS if use_ema else ()) + _WRAPPER_KEYS
    wrapper = next((k for k in keys if isinstance(state, Mapping) and isinstance(state.get(k), Mapping)), "")
    if wrapper:
        state = state[wrapper]
    if not (isinstance(state, Mapping) and all(isinstance(k, str) for k in state)
            and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"checkpoint {path}: expected a mapping of parameter names to tensors "
                              f"(optionally under {' or '.join(repr(k) for k in keys)})")
    _logger.info("Loaded %s from checkpoint '%s'", wrapper, path)   # timm's line
    return dict(state)


def _looks_like_safetensors(path: Path) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte little-endian header length
    that fits in the file, then the header's JSON ``{`` (a torch.save file starts with ``PK`` or
    a pickle opcode). So a safetensors file saved under another name is read as one."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError alike: unreadable
        raise SafetensorsCheckpointError(f"checkpoint {path}: not a readable .safetensors file, truncated or "
                              f"corrupt? ({_summary(err, str(err))})") from err


def _read_pickle(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear error
        # torch's message is a page of advice; the cause follows "WeightsUnpickler error:"
        detail = _first_line(str(err).partition("WeightsUnpickler error:")[2] or str(err))
        if detail.startswith("Unsupported global"):
            raise CheckpointError(f"checkpoint {path}: holds pickled Python objects, not only tensors "
                                  f"({detail}): a whole model saved with torch.save(model), or other "
                                  f"values saved beside the weights (NumPy numbers, say)? Save the "
                                  f"state_dict() alone") from err
        raise CheckpointError(f"checkpoint {path}: neither a .safetensors file nor a torch.save file "
                              f"of tensors, truncated or corrupt? ({_summary(err, detail)})") from err


def _summary(err: Exception, detail: str) -> str:
    """``"ErrorType: detail"``, or the type alone where there is no detail (an empty file)."""
    detail = _first_line(detail)
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__


def _first_line(text: str) -> str:
    """The first non-empty line of an error message, up to its first full stop, without terminal
    colour codes (torch.load puts some in its messages)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else ""


# prefixes of DDP and torch.compile wrappers, in either order (timm's clean_state_dict drops them)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def to_timm_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename IBM-style (``pos_embed.0``), DDP (``module.``) and compiled-model (``_orig_mod.``)
    keys to timm's names."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.partition(".")[2]
        if key.startswith(("pos_embed.", "cls_token.")):
            key = key.replace(".", "_")
        out[key] = value
    return out


def _describe(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     strict: bool = True) -> None:
    """Raise :class:`CheckpointError` naming mis-shaped keys and, where ``strict``, missing and
    unexpected ones."""
    expected = model.state_dict()
    missing = set(expected) - set(state) if strict else set()
    unexpected = set(state) - set(expected) if strict else set()
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


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """An RGB conv weight ``[O, 3, k, k]`` for ``in_chans`` input channels, as timm adapts
    pretrained stems: summed over RGB for one channel, else RGB repeated and scaled by
    ``3 / in_chans`` (the response to a grey image keeps its size)."""
    if weight.shape[1] != 3:
        raise CheckpointError(f"cannot adapt a first conv with {weight.shape[1]} input channels "
                              f"to in_chans={in_chans}: expected an RGB (3-channel) weight")
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, -(-in_chans // 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    return w.to(weight.dtype)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                    drop_head: bool = False, use_ema: bool = True, input_convs: Sequence[str] = (),
                    strict: bool = True):
    """Load ``path`` (a checkpoint file, or a state dict itself, as a pretrained config's
    ``state_dict``) into ``model`` strictly (every key and shape must match; with
    ``strict=False``, as timm's ``pretrained_strict=False``, keys on one side only are skipped).
    Returns ``load_state_dict``'s missing and unexpected keys, as timm's ``load_checkpoint``
    does (with ``strict=False``, what was skipped).

    ``drop_head=True`` keeps the model's own classifier (``head.*``), as timm does when a
    pretrained model is built with another ``num_classes``. ``use_ema`` as in timm's
    ``load_checkpoint``: a checkpoint's EMA weights win over its plain ones. ``input_convs``
    names the first convs (without ``.weight``) to adapt to the model's ``in_chans`` where the
    checkpoint's are RGB (:func:`adapt_input_conv`). Position embeddings of a checkpoint
    trained at another image size are resampled to the model's patch grids (bicubic, the CLS
    row kept), as timm's ``resample_abs_pos_embed`` does for ViTs.
    """
    if isinstance(path, Mapping):
        state, path = to_timm_keys(path), "(the pretrained config's state_dict)"
    else:
        state = to_timm_keys(read_state_dict(path, use_ema))
    if hasattr(model, "patch_embed") and hasattr(model, "embed_dim"):   # trained at another size
        state = resample_checkpoint_pos_embeds(state, [p.grid_size for p in model.patch_embed],
                                               model.embed_dim)
    in_chans = getattr(model, "in_chans", 3)
    for conv in input_convs:
        key = f"{conv}.weight"
        if key in state and state[key].dim() == 4 and state[key].shape[1] != in_chans:
            state[key] = adapt_input_conv(state[key], in_chans)
    if drop_head:
        own_head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update(own_head)
    check_state_dict(model, state, f"checkpoint {path}", strict)
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as err:  # what check_state_dict does not catch, e.g. a sparse tensor
        raise CheckpointError(f"checkpoint {path}: {' '.join(str(err).split())}") from err


# How long the one request that asks the Hub whether it can be reached waits (seconds), unless
# HF_HUB_ETAG_TIMEOUT says otherwise. huggingface_hub's own download, where that request fails,
# retries five times with backoff (about 23 s, a warning each time) before it gives up.
HUB_PROBE_TIMEOUT_S = 3.0


# The weight files timm looks for in a Hub repository or a local model folder, in order.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def pretrained_path(name: str, cache_dir: Optional[str | os.PathLike] = None,
                    repo: Optional[str] = None, filename: Optional[str] = None) -> str:
    """Local path of the pretrained weights of variant ``name`` on the Hugging Face Hub:
    ``repo`` (default timm's ``timm/{name}.in1k``), its ``filename`` or, as timm looks for them,
    ``model.safetensors`` then ``pytorch_model.bin`` (see :func:`hub_file`)."""
    repo = repo or f"timm/{name}.in1k"
    filenames = [filename] if filename else list(WEIGHT_FILES)
    return hub_file(repo, filenames, cache_dir, f"pretrained weights for {name}")


def hub_file(repo: str, filenames: Sequence[str], cache_dir: Optional[str | os.PathLike] = None,
             what: str = "a file") -> str:
    """Local path of the first of ``filenames`` that Hub repository ``repo`` has.

    The local Hugging Face cache is tried first (no network); then the Hub itself, after one
    request without retries (:data:`HUB_PROBE_TIMEOUT_S`) has found that it answers: offline, or
    with ``HF_HUB_OFFLINE=1``, a :class:`CheckpointError` naming ``what`` comes at once, not
    after huggingface_hub's retries.
    """
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.utils import EntryNotFoundError
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise RuntimeError("pretrained=True needs huggingface_hub; pip install huggingface_hub, "
                           "or pass checkpoint_path=") from err
    for candidate in filenames:
        try:
            return hf_hub_download(repo, candidate, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # not cached: ask the Hub
            pass
    try:
        for candidate in filenames:
            try:
                get_hf_file_metadata(hf_hub_url(repo, candidate), timeout=_hub_probe_timeout())
            except EntryNotFoundError:
                if candidate == filenames[-1]:
                    raise
                continue
            return hf_hub_download(repo, candidate, cache_dir=cache_dir)
    except Exception as err:
        detail = " ".join(str(err).split()).rstrip(".")
        raise CheckpointDownloadError(
            f"could not fetch {what} from the Hugging Face Hub ({repo}): "
            f"{type(err).__name__}{': ' + detail if detail else ''}. Without network access, download "
            f"{filenames[0]} from https://huggingface.co/{repo} on another machine and pass "
            f"pretrained_cfg_overlay=dict(file=PATH) with pretrained=True (another num_classes or "
            f"in_chans is adapted as from the Hub)") from err


def url_cache_path(url: str, cache_dir: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """Where :func:`url_file` keeps the file at ``url`` (None where the URL names no file)."""
    filename = os.path.basename(urlparse(url).path)
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / filename if filename else None


def url_file(url: str, cache_dir: Optional[str | os.PathLike] = None, what: str = "a file") -> str:
    """Local path of the file at ``url`` (a pretrained config's ``url``), downloaded once under
    its own name into ``cache_dir``, by default torch hub's ``checkpoints`` folder, where timm
    caches it too; a :class:`CheckpointError` naming ``what`` and the URL where it cannot be
    fetched."""
    cached = url_cache_path(url, cache_dir)
    if cached is None:
        raise CheckpointError(f"{what}: the URL {url!r} names no file")
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except Exception as err:
            detail = " ".join(str(err).split()).rstrip(".")
            raise CheckpointDownloadError(
                f"could not fetch {what} from {url}: {type(err).__name__}"
                f"{': ' + detail if detail else ''}. Without network access, download it on another "
                f"machine and pass pretrained_cfg_overlay=dict(file=PATH) with pretrained=True") from err
    return str(cached)


def model_source_config(name: str, cache_dir: Optional[str | os.PathLike] = None
                        ) -> Tuple[str, dict, dict]:
    """``(architecture, pretrained_cfg, model_args)`` of a timm model source, read from its
    ``config.json`` as timm's ``create_model`` reads it: ``hf-hub:org/repo`` (the Hub or its
    cache; the weights then come from that repository) or ``local-dir:/path`` (a folder written
    by timm's ``save_for_hf``; the weights are its model.safetensors or pytorch_model.bin).
    timm's deprecated ``hf_hub:`` means ``hf-hub:``, as in timm."""
    source, _, location = name.partition(":")
    source = {"hf_hub": "hf-hub"}.get(source.lower(), source.lower())
    if source in ("hf-hub", "local-dir") and not location:
        raise ValueError(f"create_model: model name {name!r} has no model id or path after "
                         f"its '{source}:' prefix")
    if source == "hf-hub":
        if "@" in location:
            raise ValueError(f"create_model: {name!r}: revisions (@...) of Hub repositories are not "
                             f"supported; download the folder and use local-dir:")
        config_path = Path(hub_file(location, ["config.json"], cache_dir, f"the config of {location}"))
        source_fields = {"hf_hub_id": location, "hf_hub_filename": None, "source": "hf-hub"}
    elif source == "local-dir":
        folder = Path(location)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"create_model: {name!r}: no config.json in {folder}")
        folder_weights(folder, f"create_model: {name!r}")
        source_fields = {"file": str(folder), "source": "local-dir"}
    else:
        raise ValueError(f"create_model: model source {source + ':'!r} of {name!r} is not known; "
                         f"expected hf-hub: or local-dir:")
    config = json.loads(config_path.read_text())
    if "pretrained_cfg" not in config:   # timm's older single-dict layout
        config = {"architecture": config.pop("architecture", None), "pretrained_cfg": config}
        if "labels" in config["pretrained_cfg"]:
            config["pretrained_cfg"]["label_names"] = config["pretrained_cfg"].pop("labels")
    pretrained_cfg = dict(config["pretrained_cfg"], **source_fields)
    for key in ("num_classes", "label_names", "label_descriptions"):   # top-level fields win
        if key in config:
            pretrained_cfg[key] = config[key]
    model_args = dict(config.get("model_args") or {})
    _input_size_from_model_args(pretrained_cfg, model_args)
    return config.get("architecture") or "", pretrained_cfg, model_args


def _input_size_from_model_args(cfg: dict, model_args: dict) -> None:
    """Amends a model source's ``cfg`` in place from the arguments it was saved with, as timm's
    ``_parse_model_cfg`` does: a dynamic size unfixes the input size, and ``in_chans`` and (for a
    fixed size) ``img_size`` rebuild ``input_size`` as a tuple (JSON stored it as a list)."""
    if model_args.get("dynamic_img_size") or model_args.get("strict_img_size") is False:
        cfg["fixed_input_size"] = False
    if model_args.get("in_chans") is not None:
        cfg["input_size"] = (model_args["in_chans"], *cfg.get("input_size", (3, 224, 224))[1:])
        for key in ("test_input_size", "min_input_size"):
            if cfg.get(key):
                cfg[key] = (model_args["in_chans"], *cfg[key][1:])
    if model_args.get("img_size") is not None and cfg.get("fixed_input_size", False):
        size = model_args["img_size"]
        cfg["input_size"] = (cfg["input_size"][0], *((size, size) if isinstance(size, int) else size))


def folder_weights(folder: str | os.PathLike, what: str) -> str:
    """The weight file of a model folder (timm's ``save_for_hf`` layout): ``model.safetensors``,
    else ``pytorch_model.bin``; a :class:`CheckpointError` starting with ``what`` where it has
    neither."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{what}: {folder} is not a folder")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return str(folder / name)
    raise CheckpointError(f"{what}: no {' or '.join(WEIGHT_FILES)} in {folder}")


def _hub_probe_timeout() -> float:
    try:
        return float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    except (KeyError, ValueError):
        return HUB_PROBE_TIMEOUT_S
