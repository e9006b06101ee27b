"""The 11 CrossViT variants by timm's names, and ``create_model`` / ``list_models``."""
from __future__ import annotations

import fnmatch
import logging
import os
import re
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch.nn as nn

from .checkpoint import (CheckpointError, folder_weights, load_checkpoint, model_source_config,
                         pretrained_path, url_cache_path, url_file)
from .features import FeatureGetterNet, default_out_indices
from .layers import exportable_layers
from .model import CrossViT

_logger = logging.getLogger(__name__)   # timm's lines, where timm logs them

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _args(embed, depth, heads, mlp, img_scale=(1.0, 224 / 240), multi_conv=False, img_size=240):
    # timm's builder passes img_size from the variant's pretrained config (240 or 408)
    return dict(img_size=img_size, img_scale=img_scale, patch_size=[12, 16], embed_dim=list(embed),
                depth=[list(depth)] * 3, num_heads=list(heads), mlp_ratio=list(mlp),
                multi_conv=multi_conv)


# timm.models.crossvit model arguments, variant by variant.
MODEL_ARGS: Dict[str, dict] = {
    "crossvit_tiny_240": _args((96, 192), (1, 4, 0), (3, 3), (4, 4, 1)),
    "crossvit_small_240": _args((192, 384), (1, 4, 0), (6, 6), (4, 4, 1)),
    "crossvit_base_240": _args((384, 768), (1, 4, 0), (12, 12), (4, 4, 1)),
    "crossvit_9_240": _args((128, 256), (1, 3, 0), (4, 4), (3, 3, 1)),
    "crossvit_15_240": _args((192, 384), (1, 5, 0), (6, 6), (3, 3, 1)),
    "crossvit_18_240": _args((224, 448), (1, 6, 0), (7, 7), (3, 3, 1)),
    "crossvit_9_dagger_240": _args((128, 256), (1, 3, 0), (4, 4), (3, 3, 1), multi_conv=True),
    "crossvit_15_dagger_240": _args((192, 384), (1, 5, 0), (6, 6), (3, 3, 1), multi_conv=True),
    "crossvit_15_dagger_408": _args((192, 384), (1, 5, 0), (6, 6), (3, 3, 1),
                                    img_scale=(1.0, 384 / 408), multi_conv=True, img_size=408),
    "crossvit_18_dagger_240": _args((224, 448), (1, 6, 0), (7, 7), (3, 3, 1), multi_conv=True),
    "crossvit_18_dagger_408": _args((224, 448), (1, 6, 0), (7, 7), (3, 3, 1),
                                    img_scale=(1.0, 384 / 408), multi_conv=True, img_size=408),
}


class UnknownModelError(ValueError, RuntimeError):
    """A model name or pretrained tag that is not one of the variants'. A RuntimeError too, as
    ``timm.create_model`` raises for an unknown model (code catching that catches this)."""


def default_cfg(name: str) -> dict:
    """timm's default config of variant ``name`` (input size, normalisation, hub id, ...)."""
    dagger = "dagger" in name
    res = 408 if name.endswith("408") else 240
    first_conv = ("patch_embed.0.proj.0", "patch_embed.1.proj.0") if dagger else ("patch_embed.0.proj", "patch_embed.1.proj")
    return dict(url="", hf_hub_id=f"timm/{name}.in1k", architecture=name, tag="in1k",
                custom_load=False, num_classes=1000, input_size=(3, res, res), pool_size=None,
                crop_pct=1.0 if res == 408 else 0.875, crop_mode="center",
                interpolation="bicubic", mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                fixed_input_size=True, first_conv=first_conv, classifier=("head.0", "head.1"),
                license="apache-2.0")


def list_models(filter: Union[str, Iterable[str]] = "", module: Union[str, Iterable[str]] = "",
                pretrained: bool = False, exclude_filters: Union[str, Iterable[str]] = "",
                name_matches_cfg: bool = False, include_tags: Optional[bool] = None) -> List[str]:
    """The variant names ``create_model`` accepts, as ``timm.list_models`` lists them (its
    arguments, its natural order: ``crossvit_9_240`` before ``crossvit_15_240``): ``filter`` and
    ``exclude_filters`` fnmatch wildcards, ``module`` ``'crossvit'`` (any other lists none),
    ``include_tags`` (default ``pretrained``) the names with their tag (``.in1k``). Every
    variant has pretrained weights and a config of its own name."""
    names = list(MODEL_ARGS) if not _strings(module) or "crossvit" in _strings(module) else []
    include, exclude = _strings(filter), _strings(exclude_filters)
    if include_tags if include_tags is not None else pretrained:
        names = [f"{name}.in1k" for name in names]
        # a filter without a tag matches the tagged names too, as timm expands it
        include, exclude = ([g for f in fs for g in ((f, f + ".*") if "." not in f else (f,))]
                            for fs in (include, exclude))
    if include:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, f) for f in include)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, f) for f in exclude)]
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", n)])


def _strings(value: Union[str, Iterable[str]]) -> List[str]:
    """timm's filter arguments: one string, or several; empty ones dropped."""
    return [v for v in ([value] if isinstance(value, str) else list(value or ())) if v]


def create_model(model_name: str, pretrained: bool = False, pretrained_cfg: Union[str, dict, None] = None,
                 pretrained_cfg_overlay: Optional[dict] = None, checkpoint_path: Optional[str] = None,
                 cache_dir: Optional[str] = None, scriptable: Optional[bool] = None,
                 exportable: Optional[bool] = None, no_jit: Optional[bool] = None, **kwargs) -> nn.Module:
    """Build variant ``model_name`` (or ``model_name.in1k``); ``kwargs`` override its arguments as in
    ``timm.create_model`` (its parameters, in its order), which also drops the ones that are None.

    The pretrained config (timm's, a ``pretrained_cfg`` dict or tag, then
    ``pretrained_cfg_overlay``) sets the defaults of ``num_classes``, ``in_chans`` and
    ``img_size`` (from its ``input_size``), as timm's builder does. A ``pretrained_cfg`` dict is
    merged into the variant's config, except where the weights come from: as in timm, that is
    the dict's own (``file``, ``url``, ``hf_hub_id``, ``state_dict``; none: ``pretrained=True``
    has nothing to load), never timm's published weights. ``scriptable``, ``exportable`` and
    ``no_jit`` set timm's layer config while the model is built; of them only ``exportable``
    reaches CrossVit's layers (its attention then runs without SDPA). ``checkpoint_path`` loads a
    ``.safetensors`` or ``torch.save`` file (timm or official IBM key style; a training
    checkpoint's EMA weights first, as timm) strictly; ``pretrained=True`` loads the config's
    ``state_dict`` or ``file``, else the weights of its ``hf_hub_id`` (timm's published ones
    unless overlaid) from the Hugging Face Hub or its local cache (``cache_dir``):
    ``hf_hub_filename``, else ``model.safetensors`` or ``pytorch_model.bin``, as timm; else the
    file at its ``url``, downloaded once into ``cache_dir`` (default torch hub's checkpoints
    folder, as timm). With another ``num_classes`` the
    pretrained head is left out, with another ``in_chans`` the first convs are adapted, and
    ``pretrained_strict=False`` skips keys on one side only, as in timm. A checkpoint trained at
    another image size loads with its position embeddings resampled to ``img_size``. The model
    carries what timm's factory records (``_traits``, ``_model_args``), which timm's input
    config and ``save_for_hf`` read. ``model_name`` may also be a timm model source,
    ``hf-hub:org/repo`` or ``local-dir:/path`` (written by timm's ``save_for_hf``), whose
    config.json names the variant and holds its config and arguments.

    ``features_only=True`` returns the backbone as timm 1.0.31 builds it
    (:class:`crossvit_fast.features.FeatureGetterNet`: a list of NCHW feature maps, by default
    the last block's of each branch; ``out_indices`` picks others, index ``b * 3 + i`` being
    branch ``b`` after block ``i``; ``feature_info`` describes them).
    """
    if ":" in model_name:   # timm's model sources: hf-hub:org/repo, local-dir:/path
        return _create_from_source(model_name, pretrained, checkpoint_path, cache_dir, pretrained_cfg,
                                   pretrained_cfg_overlay,
                                   dict(kwargs, scriptable=scriptable, exportable=exportable, no_jit=no_jit))
    variant, _, tag = model_name.partition(".")
    if variant not in MODEL_ARGS:
        raise UnknownModelError(f"unknown CrossViT variant {model_name!r}; known variants: {', '.join(list_models())}")
    if isinstance(pretrained_cfg, str):
        tag, pretrained_cfg = pretrained_cfg, None
    if tag and tag != "in1k":
        raise UnknownModelError(f"unknown pretrained tag {tag!r} of {variant}: timm publishes 'in1k' only")
    if scriptable:   # timm's train.py --torchscript: said here, not at the script call
        warnings.warn("crossvit_fast: scriptable=True, but this model cannot be compiled by "
                      "torch.jit.script (its fused ops are Python custom ops); torch.jit.trace, "
                      "torch.export and torch.compile work", UserWarning, stacklevel=2)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    # what timm keeps of the factory arguments (model._model_args: save_for_hf's model_args)
    model_args = {k: v for k, v in kwargs.items() if k not in ("device", "dtype", "pretrained_model_args")}
    pretrained_strict = kwargs.pop("pretrained_strict", True)
    # the arguments a model source was saved with (timm's builder keeps them on the model)
    pretrained_model_args = dict(kwargs.pop("pretrained_model_args", None) or {})
    features_only = kwargs.pop("features_only", False)
    # features_only arguments; timm drops them without features_only too
    out_indices, feature_cls = kwargs.pop("out_indices", None), kwargs.pop("feature_cls", None)
    cfg = _pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay)
    with exportable_layers(bool(exportable)):   # as timm builds under set_layer_config(exportable=...)
        model = CrossViT(**{**MODEL_ARGS[variant], **_defaults_from_cfg(cfg), **kwargs})
    model.pretrained_cfg = model.default_cfg = cfg
    model.pretrained_model_args = pretrained_model_args
    model._traits = _timm_traits(model, cfg)
    if pretrained:
        load_checkpoint(model, _pretrained_weights(variant, cfg, cache_dir),
                        drop_head=model.num_classes != cfg["num_classes"],
                        input_convs=cfg["first_conv"], strict=pretrained_strict)
    if checkpoint_path:   # timm's scripts pass '' for none, as timm's create_model reads it
        load_checkpoint(model, checkpoint_path)
    if features_only:
        model = _feature_net(model, out_indices, feature_cls)
    model._model_args = model_args
    return model


# the keys of a pretrained config that say where its weights come from
_WEIGHTS_SOURCE_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename", "state_dict", "source")


def _pretrained_cfg(variant: str, pretrained_cfg, overlay: Optional[Mapping]) -> dict:
    """The variant's config, then a ``pretrained_cfg`` dict (or timm ``PretrainedCfg``) over it
    with its weights' source in place of the variant's, then ``overlay`` over both."""
    cfg = default_cfg(variant)
    if pretrained_cfg is not None:
        if hasattr(pretrained_cfg, "to_dict"):   # timm's PretrainedCfg
            pretrained_cfg = pretrained_cfg.to_dict()
        if not isinstance(pretrained_cfg, Mapping):
            raise TypeError(f"create_model: pretrained_cfg must be a tag, a dict or timm's PretrainedCfg, "
                            f"got {type(pretrained_cfg).__name__}")
        cfg = {k: v for k, v in cfg.items() if k not in _WEIGHTS_SOURCE_KEYS}
        cfg.update(pretrained_cfg)
    if overlay is not None and not isinstance(overlay, Mapping):
        raise TypeError(f"create_model: pretrained_cfg_overlay must be a dict, got {type(overlay).__name__}")
    return {**cfg, **(overlay or {})}


def _create_from_source(name: str, pretrained: bool, checkpoint_path: Optional[str],
                        cache_dir: Optional[str], pretrained_cfg, pretrained_cfg_overlay: Optional[dict],
                        kwargs: dict) -> nn.Module:
    """``create_model`` of a timm model source (``hf-hub:org/repo``, ``local-dir:/path``): its
    config.json names the variant, gives the pretrained config (the weights' location, classes,
    input size) and the model arguments, which ``kwargs`` override, as in timm."""
    if pretrained_cfg is not None:
        raise ValueError(f"create_model: pretrained_cfg cannot be given with the model source {name!r}, "
                         f"whose config.json holds it (pretrained_cfg_overlay can amend it)")
    architecture, source_cfg, model_args = model_source_config(name, cache_dir)
    variant = architecture.partition(".")[0]
    if variant not in MODEL_ARGS:
        raise ValueError(f"create_model: {name!r} holds a {architecture or 'unnamed'!r} model, not a "
                         f"CrossViT variant ({', '.join(list_models())})")
    if model_args:   # as timm: the saved arguments are defaults, and recorded as the source's
        kwargs = {**model_args, **kwargs, "pretrained_model_args": dict(model_args)}
    return create_model(variant, pretrained=pretrained, checkpoint_path=checkpoint_path,
                        cache_dir=cache_dir, pretrained_cfg=source_cfg,
                        pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)


def _pretrained_weights(variant: str, cfg: dict, cache_dir: Optional[str]) -> Union[str, Mapping]:
    """What ``pretrained=True`` loads, in timm's order: a model source's own weights (its
    ``source``: the ``hf_hub_id`` repository's, the ``local-dir`` folder's), else the config's
    ``state_dict``, its ``file``, (with ``TIMM_USE_OLD_CACHE=1``) its ``url``'s file where
    already cached, its ``hf_hub_id`` repository's weights (the Hub or its cache), the file at
    its ``url`` (downloaded once); a CheckpointError (a RuntimeError, as timm's)
    where it names none. Logs where from, as timm does."""
    source = cfg.get("source")
    if source == "local-dir":
        _logger.info(f"Loading pretrained weights from local directory ({cfg['file']})")
        return folder_weights(cfg["file"], f"pretrained weights for {variant}")
    if cfg.get("state_dict") and source != "hf-hub":
        _logger.info("Loading pretrained weights from state dict")
        return cfg["state_dict"]
    if cfg.get("file") and source != "hf-hub":
        _logger.info(f"Loading pretrained weights from file ({cfg['file']})")
        return cfg["file"]
    if cfg.get("url") and source != "hf-hub" and _use_old_cache():
        cached = url_cache_path(cfg["url"])   # timm looks in the default folder only
        if cached is not None and cached.is_file():
            _logger.info(f"Loading pretrained weights from url ({cfg['url']})")
            return str(cached)
    if cfg.get("hf_hub_id"):
        hub_filename = cfg.get("hf_hub_filename")
        location = (cfg["hf_hub_id"], hub_filename) if hub_filename else cfg["hf_hub_id"]
        _logger.info(f"Loading pretrained weights from Hugging Face hub ({location})")
        return pretrained_path(variant, cache_dir, repo=cfg["hf_hub_id"], filename=hub_filename)
    if cfg.get("url"):
        _logger.info(f"Loading pretrained weights from url ({cfg['url']})")
        return url_file(cfg["url"], cache_dir, f"pretrained weights for {variant}")
    raise CheckpointError(f"No pretrained weights exist for {cfg.get('architecture') or variant}: its "
                          f"pretrained config names no state_dict, file, hf_hub_id or url. Use "
                          f"pretrained=False for random init, or pass checkpoint_path=")


def _use_old_cache() -> bool:
    """timm's ``TIMM_USE_OLD_CACHE=1``: a ``url``'s file already in torch hub's checkpoints
    folder wins over the Hub."""
    try:
        return int(os.environ.get("TIMM_USE_OLD_CACHE", 0)) > 0
    except ValueError:
        return False


def _timm_traits(model: CrossViT, cfg: dict) -> dict:
    """What timm 1.0.31's builder records of the model's input (``model._traits``, read by
    ``timm.data.resolve_input_data_config``): its image size, whether that is fixed, its first
    convs."""
    first_conv = cfg.get("first_conv")
    return dict(img_size=tuple(model.img_size), fixed_input_size=not model.dynamic_img_size,
                first_conv=tuple(first_conv) if isinstance(first_conv, list) else first_conv)


def _feature_net(model: CrossViT, out_indices, feature_cls) -> nn.Module:
    """``model`` wrapped as timm 1.0.31 wraps CrossVit for ``features_only``: a feature getter
    over ``forward_intermediates``, by default the last block's features of each branch."""
    if out_indices is None:
        out_indices = default_out_indices(model.num_feature_blocks, model.num_branches)
    if feature_cls is None or (isinstance(feature_cls, str) and feature_cls.lower() == "getter"):
        feature_cls = FeatureGetterNet
    elif isinstance(feature_cls, str):
        raise ValueError(f"create_model: feature_cls {feature_cls!r} is not supported for CrossViT; "
                         f"its features come from forward_intermediates (feature_cls='getter', as timm's)")
    net = feature_cls(model, out_indices=out_indices)
    net.in_chans = model.in_chans
    net._traits = dict(model._traits)
    # timm's pretrained_cfg_for_features: the classifier's entries mean nothing for a backbone
    net.pretrained_cfg = net.default_cfg = {k: v for k, v in model.pretrained_cfg.items()
                                            if k not in ("num_classes", "classifier", "global_pool")}
    return net


def _defaults_from_cfg(cfg: dict) -> dict:
    """The model arguments a pretrained config implies, as timm's builder takes them:
    ``num_classes`` (unless negative), ``global_pool``, and from ``input_size`` ``in_chans`` and,
    for a fixed input size, ``img_size``."""
    defaults = {}
    if cfg.get("num_classes") is not None and cfg["num_classes"] >= 0:
        defaults["num_classes"] = cfg["num_classes"]
    if cfg.get("global_pool") is not None:
        defaults["global_pool"] = cfg["global_pool"]
    input_size = cfg.get("input_size")
    if input_size is not None:
        if len(input_size) != 3:
            raise ValueError(f"pretrained_cfg: input_size must be (channels, height, width), got {input_size!r}")
        defaults["in_chans"] = input_size[0]
        if cfg.get("fixed_input_size", False):
            defaults["img_size"] = tuple(input_size[-2:])
    return defaults
