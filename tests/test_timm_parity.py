"""crossvit_fast.CrossViT against timm's own CrossVit: strict weight loading, same outputs.

Runs wherever timm imports (tests/timm_import.py makes that work without torchvision).
"""
import contextlib
import copy

import pytest
import torch

import crossvit_fast

from .numerics import rel_err
from .timm_import import import_timm

TOL = 1e-5  # fp32, relative


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def pair(timm, name, **kwargs):
    torch.manual_seed(0)
    ref = timm.create_model(name, **kwargs).eval()
    ours = crossvit_fast.create_model(name, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("name", crossvit_fast.list_models())
def test_logits_and_features_match_timm(timm, name):
    ref, ours = pair(timm, name)
    res = ref.pretrained_cfg["input_size"][-1]
    x = torch.randn(2 if res == 240 else 1, 3, res, res)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < TOL
        for a, b in zip(ours.forward_features(x), ref.forward_features(x)):
            assert rel_err(a, b) < TOL


def test_intermediates_pre_logits_and_resized_input_match_timm(timm):
    ref, ours = pair(timm, "crossvit_9_240")
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)  # not the model's 240: both rescale per branch
        with pytest.warns(UserWarning, match="resized"):   # ours says so, once
            assert rel_err(ours(x), ref(x)) < TOL
        x = torch.randn(1, 3, 240, 240)
        a = ours.forward_intermediates(x, indices=[0, 4], norm=True)
        b = ref.forward_intermediates(x, indices=[0, 4], norm=True)
        for s, t in zip(a[0] + a[1], b[0] + b[1]):
            assert s.shape == t.shape and rel_err(s, t) < TOL
        feats = ours.forward_features(x)
        assert rel_err(ours.forward_head(feats, pre_logits=True), ref.forward_head(ref.forward_features(x), pre_logits=True)) < TOL


def test_training_step_matches_timm_with_dropout_and_stochastic_depth(timm):
    """Same seed, same random draws, same gradients: a timm training script sees no difference."""
    kwargs = dict(drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_rate=0.1, num_classes=7)
    ref, ours = pair(timm, "crossvit_tiny_240", **kwargs)
    ref.train(), ours.train()
    x = torch.randn(2, 3, 240, 240)
    outs = []
    for model in (ref, ours):
        torch.manual_seed(3)
        y = model(x)
        y.square().mean().backward()
        outs.append((y, {n: p.grad for n, p in model.named_parameters()}))
    assert rel_err(outs[1][0], outs[0][0]) < TOL
    for name, g in outs[0][1].items():
        assert rel_err(outs[1][1][name], g) < 1e-4, name


@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_9_dagger_240"])
def test_bf16_autocast_matches_timm(timm, name, fused_cls_projection, norm_threshold):
    """Under autocast the projected CLS token comes out in bf16 and meets fp32 patch tokens, as
    in timm (whose concatenation promotes): within 4x timm's own bf16 error of float64 timm."""
    ref, ours = pair(timm, name)
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            timm_bf16, ours_bf16 = ref(x), ours(x)
    assert ours_bf16.dtype == timm_bf16.dtype
    assert rel_err(ours_bf16, expected) <= 4 * max(rel_err(timm_bf16, expected), 1e-3)


def test_timm_defaults_match(timm):
    ref, ours = pair(timm, "crossvit_15_dagger_408")
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    for key, value in ref.pretrained_cfg.items():   # every key timm's config has, same value
        assert as_tuple(ours.pretrained_cfg.get(key)) == as_tuple(value), key
    assert ours.no_weight_decay() == ref.no_weight_decay()
    assert ours.group_matcher() == ref.group_matcher()
    assert ours.feature_info == ref.feature_info


def test_every_variants_config_is_timms(timm):
    """The config ``create_model`` gives each of the 11 variants (no model built: timm's registry)
    has every key of timm's, with timm's value."""
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    for name in crossvit_fast.list_models():
        theirs = timm.models.get_pretrained_cfg(f"{name}.in1k").to_dict()
        ours = crossvit_fast.variants.default_cfg(name)
        for key, value in theirs.items():
            assert as_tuple(ours.get(key)) == as_tuple(value), (name, key)


def test_official_ibm_style_checkpoint_loads_strictly(timm, tmp_path):
    ref, _ = pair(timm, "crossvit_tiny_240")
    ibm = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
           for k, v in ref.state_dict().items()}
    assert "pos_embed.0" in ibm
    torch.save({"model": ibm}, tmp_path / "crossvit_tiny_224.pth")
    ours = crossvit_fast.create_model("crossvit_tiny_240", checkpoint_path=str(tmp_path / "crossvit_tiny_224.pth")).eval()
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < TOL


@contextlib.contextmanager
def no_tf32():
    """fp32 matmuls and convolutions in full fp32, restoring the caller's settings after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("name", crossvit_fast.list_models())
def test_gpu_fp32_and_bf16_autocast_match_timm(timm, name, backend, fused_cls_projection):
    """On the GPU, against timm in float64: fp32 (tf32 off) within 1e-5, or within 2x timm's own
    fp32 error where that is larger (crossvit_base's 768-wide rows: 1.1e-5 on an H100); bf16
    autocast within 4x timm's own bf16 error."""
    reason = crossvit_fast.backends.unavailable_reason(backend, "cuda")
    if reason:
        pytest.skip(reason)
    ref, ours = pair(timm, name)
    ref, ours = ref.cuda(), ours.cuda()
    res = ref.pretrained_cfg["input_size"][-1]
    x = torch.randn(4, 3, res, res, device="cuda")
    with torch.no_grad(), crossvit_fast.use_backend(backend), no_tf32():
        expected = ref.double()(x.double()).float()
        timm_fp32 = ref.float()(x)
        assert rel_err(ours(x), expected) <= max(TOL, 2 * rel_err(timm_fp32, expected))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            timm_bf16 = ref(x)
            ours_bf16 = ours(x)
    assert rel_err(ours_bf16, expected) <= 4 * max(rel_err(timm_bf16, expected), 1e-3)


@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_9_dagger_240"])
def test_a_seeded_model_starts_from_timms_weights(timm, name):
    """The same seed draws timm's initial weights (torch's own trunc_normal_ samples another way
    from torch 2.13 on): a from-scratch run starts where timm's would."""
    torch.manual_seed(0)
    ref = timm.create_model(name).state_dict()
    torch.manual_seed(0)
    ours = crossvit_fast.create_model(name).state_dict()
    assert ref.keys() == ours.keys()
    differing = [k for k in ref if not torch.equal(ref[k], ours[k])]
    assert not differing, differing[:5]


@pytest.mark.parametrize("fused_attn", [True, False])
def test_branch_block_takes_timms_attention_mask(timm, fused_attn):
    """timm's Block and Attention take ``attn_mask`` and ``is_causal`` (was: TypeError) and have
    ``attn_dim`` and ``gate``; the same outputs as timm's, float64, SDPA and the matrix path. A
    Block built with its defaults norms with timm's default eps, 1e-6 (was: 1e-5)."""
    from crossvit_fast.layers import Block
    torch.manual_seed(0)
    ours = Block(16, num_heads=2, qkv_bias=True).double().eval()
    theirs = timm.models.vision_transformer.Block(16, num_heads=2, qkv_bias=True).double().eval()
    theirs.load_state_dict(ours.state_dict())
    ours.attn.fused_attn = theirs.attn.fused_attn = fused_attn
    assert (ours.attn.attn_dim, ours.attn.gate) == (theirs.attn.attn_dim, theirs.attn.gate)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    keep = torch.rand(2, 1, 5, 5) > 0.3
    keep[..., 0] = True   # every query attends somewhere
    for kwargs in (dict(), dict(is_causal=True), dict(attn_mask=keep),
                   dict(attn_mask=torch.randn(2, 1, 5, 5, dtype=torch.float64))):
        expected = theirs(x, **kwargs)
        assert rel_err(ours(x, **kwargs), expected) < 1e-12, kwargs
        assert rel_err(ours.attn(x, **kwargs), theirs.attn(x, **kwargs)) < 1e-12, kwargs
    assert rel_err(ours(x, is_causal=True), ours(x)) > 1e-3   # the mask is not ignored
