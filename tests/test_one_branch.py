"""The one-branch configuration timm's CrossVit also builds (one ``patch_size``): its CLS token,
projected, attends over its own patch tokens. Same keys, logits, intermediates and gradients as
timm's; every backend; the arguments' lengths checked."""
import re

import numpy as np
import pytest
import torch

from crossvit_fast import CrossViT, create_model, use_backend

from .conftest import ALL_BACKENDS
from .numerics import FP32_PAIR_TOL, rel_err
from .timm_import import import_timm

ONE_BRANCH_ARGS = dict(img_size=48, img_scale=(1.0,), patch_size=(12,), embed_dim=(24,),
                       depth=((2, 1), (1, 0)), num_heads=(2,), mlp_ratio=(2, 1), num_classes=10)


@pytest.fixture()
def pair():
    """timm's one-branch CrossVit and ours with its weights, both in eval mode."""
    timm = import_timm()
    reference = timm.models.crossvit.CrossVit(**ONE_BRANCH_ARGS).eval()
    model = CrossViT(**ONE_BRANCH_ARGS).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


def test_state_dict_logits_and_intermediates_match_timm(pair):
    reference, model = pair
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():   # eval and no grad: the in-place CLS write of the fused path
        assert rel_err(model(x), reference(x)) < FP32_PAIR_TOL
        got = model.forward_intermediates(x, indices=2)
        want = reference.forward_intermediates(x, indices=2)
    assert len(got[0]) == len(want[0]) == 1 and len(got[1]) == len(want[1]) == 2
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(g, w) < FP32_PAIR_TOL


def test_training_step_gradients_match_timm(pair):
    reference, model = pair
    reference.train(), model.train()
    x = torch.randn(2, 3, 48, 48)
    reference(x).square().mean().backward()
    model(x).square().mean().backward()
    want = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, want[name].grad) < FP32_PAIR_TOL, name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_backend_runs_it(pair, backend):
    """Forward and backward on each backend against the torch backend (the fusion over the
    branch's own patches goes through the backend's cross-attention and norm kernels)."""
    _, model = pair
    x = torch.randn(2, 3, 48, 48)
    results = []
    for name in ("torch", backend):
        model.zero_grad(set_to_none=True)
        with use_backend(name):
            logits = model(x)
            logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want_logits, want_grads), (got_logits, got_grads) = results
    assert rel_err(got_logits, want_logits) < 2e-5
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) < 2e-5, name


def test_attention_maps_checkpointing_and_features_only(pair):
    _, model = pair
    x = torch.randn(2, 3, 48, 48)
    logits, maps = model.forward_attention_maps(x)
    assert list(maps) == ["blocks.0.fusion.0.0.attn.attn_drop", "blocks.1.fusion.0.attn.attn_drop"]
    assert maps["blocks.0.fusion.0.0.attn.attn_drop"].shape == (2, 2, 1, 1 + 16)
    torch.testing.assert_close(maps["blocks.1.fusion.0.attn.attn_drop"].sum(-1),
                               torch.ones(2, 2, 1))

    model.train()
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        grads.append(model.cls_token_0.grad.clone())
    assert rel_err(grads[1], grads[0]) < 1e-6

    features = create_model("crossvit_tiny_240", features_only=True, img_size=48, **{
        k: v for k, v in ONE_BRANCH_ARGS.items() if k not in ("img_size", "num_classes")})
    assert features.feature_info.channels() == [24]
    assert [tuple(f.shape) for f in features(x)] == [(2, 24, 4, 4)]


@pytest.mark.parametrize("change, message", [
    (dict(patch_size=(12, 16, 8), embed_dim=(24, 24, 24), num_heads=(2, 2, 2)),
     r"patch_size must have one entry per branch, one or two branches.*\(12, 16, 8\)"),
    (dict(embed_dim=(24, 48)), r"embed_dim must have one entry per branch \(1, as patch_size \(12,\)\)"),
    (dict(num_heads=()), r"num_heads must have an entry for each of the 1 branches, got \(\)"),
    (dict(patch_size=(12, 16), embed_dim=(24, 48), num_heads=(2, 2), img_scale=(1.0,)),
     r"img_scale must have an entry for each of the 2 branches, got \(1.0,\)"),
    (dict(mlp_ratio=()), r"mlp_ratio must have an entry for each of the 1 branches"),
    *((dict(patch_size=(12, 16), embed_dim=(24, 48), num_heads=(2, 2), img_scale=scale),
       r"img_scale must give each branch a positive, finite scale of its image size, got "
       + re.escape(repr(scale)))
      for scale in ((1.0, -0.5), (0.0, 1.0), (1.0, float("nan")), (1.0, float("inf")))),
    (dict(depth=(1, 3, 1)), r"depth must list each multi-scale block's .*got \(1, 3, 1\)"),
    (dict(patch_size=12), r"patch_size must be a list or tuple with an entry per branch, got 12"),
    (dict(depth=((1,),)), r"each depth entry must give the 1 branches' depths, its last number "
                          r"the fusion's \(at least 2 numbers\), got \(1,\)"),
    (dict(depth=((0, 1),)), r"must give every branch at least one block .*got \(0, 1\)"),
    (dict(patch_size=(12, 16), embed_dim=(24, 48), num_heads=(2, 2), img_scale=(1.0, 1.0),
          depth=((2, 1, 1), (2, 1, 1))),
     r"depth \(\(2, 1, 1\), \(2, 1, 1\)\): entry 1, \(2, 1, 1\), needs 2 drop-path rates where "
     r"timm's schedule .* 4 in all\) has 1 left"),
])
def test_arguments_of_the_wrong_length_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        CrossViT(**dict(ONE_BRANCH_ARGS, **change))


@pytest.mark.parametrize("depth", [((2, 1, 1), (2, 1, 1)), ((0, 1, 1),)])
def test_depths_refused_here_fail_in_timm_too(depth):
    """What the depth checks refuse at construction, timm's CrossVit cannot build or run."""
    timm = import_timm()
    args = dict(img_size=48, patch_size=(12, 16), embed_dim=(24, 48), num_heads=(2, 2),
                mlp_ratio=(2, 2, 1), depth=depth, num_classes=10)
    with pytest.raises(ValueError, match="depth"):
        CrossViT(**args)
    with pytest.raises(Exception):
        timm.models.crossvit.CrossVit(**args).eval()(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("name, size, change", [
    # a variant cut to one branch: timm reads num_heads[0] and each depth entry's first and last
    ("crossvit_9_240", 48, dict(patch_size=(12,), embed_dim=(128,), img_scale=(1.0,))),
    # two branches with a longer depth entry: timm's drop-path schedule counts max(all but last)
    # (at 120 px, where timm's second branch, int(120 * 224 / 240) = 112 px, tiles)
    ("crossvit_tiny_240", 120, dict(depth=[[1, 3, 2, 1]], drop_path_rate=0.3)),
    # two numbers per entry: timm reads the second as branch 1's depth and the fusion's
    ("crossvit_tiny_240", 120, dict(depth=[[1, 2], [2, 1]], drop_path_rate=0.3)),
    # any list-like timm takes, a NumPy array too
    ("crossvit_tiny_240", 120, dict(embed_dim=np.array([96, 192]))),
    # NumPy head counts (the fused cross-attention takes them as ints)
    ("crossvit_tiny_240", 120, dict(num_heads=np.array([3, 3]))),
    ("crossvit_tiny_240", 120, dict(num_heads=(np.int32(3), np.int64(3)))),
])
def test_longer_arguments_are_read_as_timm_reads_them(name, size, change):
    timm = import_timm()
    torch.manual_seed(0)
    reference = timm.create_model(name, img_size=size, **change).eval()
    model = create_model(name, img_size=size, **change).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates == [m.drop_prob for m in reference.modules() if type(m).__name__ == "DropPath"]
    assert bool(rates) == ("drop_path_rate" in change)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) < FP32_PAIR_TOL


def test_non_integer_num_heads_is_named():
    """timm fails in the forward (a reshape by a float); we say so at construction."""
    with pytest.raises(TypeError, match="num_heads must be an integer, got 3.0"):
        create_model("crossvit_tiny_240", img_size=120, num_heads=(3.0, 3.0))


def test_compiles_as_one_graph_with_eagers_gradients(pair):
    """torch.compile(fullgraph=True) traces the one-branch model's training step (forward and
    backward graphs) and gives eager's gradients."""
    _, model = pair
    model.train()
    x = torch.randn(2, 3, 48, 48)
    model(x).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().mean().backward()
    for name, g in eager.items():
        assert rel_err(model.get_parameter(name).grad, g) < 1e-5, name
