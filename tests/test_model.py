"""CrossViT: variants, timm's state_dict keys, the fused path against the naive one, the API."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import crossvit_fast
from crossvit_fast import CrossViT, create_model, list_models
from crossvit_fast.reference import naive_math

from .numerics import FP32_PAIR_TOL, rel_err
from .timm_import import import_timm

TIMM_KEYS = json.loads((Path(__file__).parent / "data" / "timm_state_dict_keys.json").read_text())
VARIANTS = sorted(TIMM_KEYS["state_dict_shapes"])


SMALL_MODEL_ARGS = dict(img_size=48, img_scale=(1.0, 32 / 48), patch_size=(12, 16), embed_dim=(24, 48),
                        depth=((1, 2, 0), (1, 2, 0), (1, 2, 0)), num_heads=(2, 2), mlp_ratio=(2, 2, 1),
                        num_classes=10)


def small_model(**kwargs) -> CrossViT:
    """A tiny CrossViT with the real structure (two branches, 3 multi-scale blocks)."""
    return CrossViT(**dict(SMALL_MODEL_ARGS, **kwargs))


def test_list_models_is_timms_eleven():
    assert sorted(list_models()) == VARIANTS and len(VARIANTS) == 11


def test_list_models_takes_timms_arguments_and_order():
    """timm's filters, module, pretrained and tags, in timm's natural order (was: no arguments,
    so list_models('crossvit_1*') raised a TypeError)."""
    timm = import_timm()
    calls = [dict(), dict(filter="crossvit_1*"), dict(filter=["*tiny*", "*_9_*"]),
             dict(filter="crossvit*", exclude_filters="*dagger*"), dict(pretrained=True),
             dict(filter="crossvit_9*", pretrained=True), dict(filter="*.in1k", pretrained=True),
             dict(module="crossvit"), dict(filter="crossvit*", include_tags=True),
             dict(filter="crossvit_15*", exclude_filters="*408", include_tags=True),
             dict(filter="crossvit*", name_matches_cfg=True)]
    for kwargs in calls:
        theirs = timm.list_models(**{"module": "crossvit", **kwargs})   # timm's CrossViTs
        assert list_models(**kwargs) == theirs and theirs, kwargs
    assert list_models()[:2] == ["crossvit_9_240", "crossvit_9_dagger_240"]
    assert list_models(module="vision_transformer") == [] and list_models("resnet*") == []


def test_create_model_takes_timms_positional_arguments():
    """timm's order: (name, pretrained, pretrained_cfg, pretrained_cfg_overlay, checkpoint_path,
    cache_dir, ...): a dict third is the config (was: read as a checkpoint path)."""
    model = create_model("crossvit_tiny_240", False, dict(num_classes=10), dict(crop_pct=0.9))
    assert model.num_classes == 10 and model.pretrained_cfg["crop_pct"] == 0.9


def test_create_model_takes_timms_factory_arguments():
    """timm's train.py passes None for unset options and layer-config flags; timm drops those."""
    model = create_model("crossvit_tiny_240.in1k", drop_path_rate=None, global_pool=None,
                         drop_block_rate=None, scriptable=False, exportable=True, no_jit=None,
                         pretrained_cfg_overlay=None, num_classes=5)
    assert model.num_classes == 5 and model.global_pool == "token"
    # exportable=True builds the branch attention without SDPA, as timm's layer config does
    # (its maps then reach attn_drop, where timm's AttentionExtract hooks read them)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(fused) == 15 and not any(fused)   # 3 blocks x (1 + 4) branch attentions
    assert all(m.fused_attn for m in create_model("crossvit_tiny_240").modules() if hasattr(m, "fused_attn"))
    with pytest.raises(ValueError, match="timm publishes 'in1k' only"):
        create_model("crossvit_tiny_240.in21k")


def test_scriptable_true_says_at_once_that_scripting_cannot_work():
    """timm's train.py --torchscript builds with scriptable=True, then scripts: the model says
    at build time what works instead, not only at the script call."""
    with pytest.warns(UserWarning, match="cannot be compiled by torch.jit.script.*torch.jit.trace"):
        create_model("crossvit_tiny_240", scriptable=True)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(RuntimeError, match="unknown CrossViT variant 'crossvit_huge'.*crossvit_tiny_240"):
        create_model("crossvit_huge")


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_keys_and_shapes_equal_timms(name):
    with torch.device("meta"):
        model = create_model(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == TIMM_KEYS["state_dict_shapes"][name]


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_runs_forward_and_backward(name):
    model = create_model(name)
    res = model.pretrained_cfg["input_size"][-1]
    batch = 1 if res > 240 else 2
    x = torch.randn(batch, 3, res, res, requires_grad=True)
    logits = model(x)
    assert logits.shape == (batch, 1000) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"


def test_fused_model_equals_naive_model_in_float64(fused_cls_projection):
    torch.manual_seed(0)
    model = small_model().double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    dy = torch.randn(2, 10, dtype=torch.float64)
    outs, grads = [], []
    for naive in (False, True):
        model.zero_grad()
        with naive_math(naive):
            y = model(x)
            (y * dy).sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert rel_err(outs[0], outs[1]) < 1e-10
    for name in grads[1]:
        assert rel_err(grads[0][name], grads[1][name]) < 1e-9, name


def test_stochastic_depth_and_dropout_train_like_the_naive_model():
    """Same seed, same random draws: training-mode outputs equal the naive model's."""
    model = small_model(drop_path_rate=0.3, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_rate=0.2).double().train()
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    outs = []
    for naive in (False, True):
        torch.manual_seed(1)
        with naive_math(naive):
            outs.append(model(x))
    assert rel_err(outs[0], outs[1]) < 1e-10
    torch.manual_seed(2)
    assert rel_err(model(x), outs[0]) > 1e-3  # dropout is live in training mode
    model.eval()
    assert torch.equal(model(x), model(x))


def test_stochastic_depth_alone_uses_the_fused_cross_attention(monkeypatch):
    model = small_model(drop_path_rate=0.5).train()
    calls = []
    real = crossvit_fast.ops.cls_cross_attention
    monkeypatch.setattr(crossvit_fast.ops, "cls_cross_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    model(torch.randn(2, 3, 48, 48))
    assert calls and any(not k["add_residual"] for k in calls)


def test_forward_head_and_features():
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    feats = model.forward_features(x)
    assert [f.shape for f in feats] == [(2, 17, 24), (2, 5, 48)]
    assert model.forward_head(feats, pre_logits=True).shape == (2, 72)
    assert torch.allclose(model.forward_head(feats), model(x))
    model.reset_classifier(0)
    assert model(x).shape == (2, 72) and isinstance(model.get_classifier()[0], nn.Identity)
    model.reset_classifier(5, global_pool="avg")
    assert model(x).shape == (2, 5) and model.global_pool == "avg"
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, global_pool="max")


def test_forward_intermediates():
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 6 and inter[0].shape == (2, 24, 4, 4) and inter[3].shape == (2, 48, 2, 2)
    assert all(torch.allclose(a, b) for a, b in zip(final, model.forward_features(x)))
    only = model.forward_intermediates(x, indices=[2, -1], output_fmt="NLC", intermediates_only=True)
    assert [t.shape for t in only] == [(2, 16, 24), (2, 4, 48)]
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[9])
    kept = model.prune_intermediate_layers(indices=[0, 3])
    assert kept == [0, 3] and len(model.blocks) == 1


def test_timm_helper_methods():
    model = small_model()
    assert model.no_weight_decay() == {"cls_token_0", "cls_token_1", "pos_embed_0", "pos_embed_1"}
    assert set(model.group_matcher()) == {"stem", "blocks"}
    assert model.num_features == model.head_hidden_size == 72
    assert [f["num_chs"] for f in model.feature_info] == [24] * 3 + [48] * 3


def test_other_image_sizes_are_rescaled_like_timm():
    model = small_model().eval()
    with pytest.warns(UserWarning, match="resized to the model's img_size"):
        assert model(torch.randn(1, 3, 64, 40)).shape == (1, 10)


def test_bad_images_get_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match=r"4-D image batch \[B, C, H, W\].*\(3, 48, 48\)"):
        model(torch.randn(3, 48, 48))
    with pytest.raises(ValueError, match=r"3 channels \(in_chans\), got 1"):
        model(torch.randn(2, 1, 48, 48))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 48, 48, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.float16 but the model's parameters are torch.float32"):
        model(torch.randn(2, 3, 48, 48, dtype=torch.float16))
    with pytest.raises(ValueError, match="x is on meta but the model is on cpu"):
        model(torch.randn(2, 3, 48, 48, device="meta"))
    with pytest.raises(TypeError, match=r"dense \(strided\) tensor, got layout torch.sparse_coo"):
        model(torch.randn(2, 3, 48, 48).to_sparse())
    with torch.autocast("cpu", dtype=torch.bfloat16):   # autocast casts everything but float64
        with pytest.raises(TypeError, match="x is torch.float64 .* autocast does not cast float64"):
            model(torch.randn(2, 3, 48, 48, dtype=torch.float64))
        assert model(torch.randn(2, 3, 48, 48, dtype=torch.float16)).shape == (2, 10)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        small_model(embed_dim=(25, 48))


def test_bad_images_are_runtime_errors_where_timms_are():
    """torch raises RuntimeError inside timm's CrossVit for these: handlers written for timm (its
    validate.py's retry) catch ours too (was: ValueError or TypeError alone)."""
    model = small_model()
    for x in (torch.randn(2, 1, 48, 48), torch.zeros(2, 3, 48, 48, dtype=torch.uint8),
              torch.randn(2, 3, 48, 48, dtype=torch.float16), torch.randn(2, 3, 48, 48, dtype=torch.float64),
              torch.randn(2, 3, 48, 48, device="meta"), torch.randn(2, 3, 48, 48).to_sparse()):
        with pytest.raises(RuntimeError, match="CrossViT: x "):
            model(x)
    with pytest.raises(ValueError) as err:   # timm: a ValueError too (unpacking the shape)
        model(torch.randn(3, 48, 48))
    assert not isinstance(err.value, RuntimeError)


def test_autocast_bf16_runs_and_stays_close_to_fp32(fused_cls_projection):
    torch.manual_seed(0)
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert rel_err(y, ref) < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_matches_float64_within_pytorchs_own_error(dtype, fused_cls_projection):
    """The model cast to bf16/fp16: fused vs naive, both against the float64 model."""
    torch.manual_seed(0)
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    ref = model.double()(x.double())
    model = model.to(dtype)
    fused = model(x.to(dtype))
    with naive_math():
        naive = model(x.to(dtype))
    assert rel_err(fused, ref) <= 4 * max(rel_err(naive, ref), 1e-3)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_block_chain_fusion_equals_blocks_in_turn(autocast):
    # BlockChain folds each block's closing residual add into the next block's norm1; running
    # the same Blocks one by one (nn.Sequential's forward) must give the same tokens and
    # gradients, stochastic depth (same random draws) and autocast included.
    torch.manual_seed(0)
    chain = small_model(drop_path_rate=0.2).blocks[1].blocks[1].train()
    assert isinstance(chain, crossvit_fast.layers.BlockChain) and len(chain) == 2
    x = torch.randn(2, 7, 48)
    runs = []
    for forward in (chain.forward, lambda t: nn.Sequential.forward(chain, t)):
        torch.manual_seed(1)
        chain.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(x)
        out.square().mean().backward()
        runs.append((out, {n: p.grad.clone() for n, p in chain.named_parameters()}))
    (fused, fused_grads), (plain, plain_grads) = runs
    assert fused.dtype == torch.float32
    assert rel_err(fused, plain) < FP32_PAIR_TOL
    for name, g in plain_grads.items():
        assert rel_err(fused_grads[name], g) < 1e-5, name


def test_block_norms_write_the_autocast_dtype_for_their_linears():
    block = small_model().blocks[0].blocks[1][0]
    seen = []
    block.attn.qkv.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    block.mlp.fc1.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(2, 7, 48)
    block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]


def test_small_norms_take_atens_path_by_default_with_the_same_result(monkeypatch):
    from crossvit_fast import layers, ops
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    calls = []
    for name in ("add_layer_norm", "layer_norm"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    with torch.no_grad():
        fused = model(x)                                  # the tests' default: always fuse
        n_fused = len(calls)
        monkeypatch.setattr(layers, "FUSED_NORM_MIN_ELEMENTS", 1 << 24)
        aten = model(x)                                   # the library default at this size
    assert n_fused > 0 and len(calls) == n_fused          # no fused norm call the second time
    assert rel_err(aten, fused) < 1e-5
    big = torch.randn((1 << 24) // 48 + 1, 48)
    norm = layers.LayerNorm(48)
    before = len(calls)
    norm(big)
    assert len(calls) == before + 1                       # at the threshold, the fused op


def test_block_chain_with_a_hooked_block_runs_block_by_block():
    chain = small_model().blocks[1].blocks[1].eval()
    seen = []
    chain[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x = torch.randn(2, 7, 48)
    out = chain(x)
    assert seen == [(2, 7, 48)]
    assert rel_err(out, nn.Sequential.forward(chain, x)) < FP32_PAIR_TOL


def test_norm_output_dtype_is_what_the_linear_would_cast_to():
    from crossvit_fast.layers import _linear_input_dtype
    assert _linear_input_dtype(torch.float32, "cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _linear_input_dtype(torch.float32, "cpu") == torch.bfloat16
        assert _linear_input_dtype(torch.float16, "cpu") == torch.bfloat16   # one rounding, from fp32
        assert _linear_input_dtype(torch.float64, "cpu") is None             # autocast leaves fp64 alone


def test_always_fuse_norms_lifts_the_size_threshold_inside_the_block(monkeypatch):
    from crossvit_fast import layers
    monkeypatch.setattr(layers, "FUSED_NORM_MIN_ELEMENTS", 1 << 24)
    with layers.always_fuse_norms():
        assert layers.FUSED_NORM_MIN_ELEMENTS == 0
    assert layers.FUSED_NORM_MIN_ELEMENTS == 1 << 24


def test_cls_projection_runs_timms_modules_by_default_with_the_same_result(monkeypatch):
    from crossvit_fast import layers, ops
    model = small_model().eval()
    proj = model.blocks[0].projs[0]
    rows = torch.randn(3, 1, proj[0].normalized_shape[0])
    calls = []
    real = ops.cls_projection
    monkeypatch.setattr(ops, "cls_projection", lambda *a, **k: calls.append(1) or real(*a, **k))
    modules = proj(rows)                                  # the library default
    assert calls == []
    monkeypatch.setattr(layers, "FUSED_CLS_PROJECTION", True)
    fused = proj(rows)
    assert calls == [1]
    assert rel_err(modules, fused) < 1e-5
    assert rel_err(modules, nn.Sequential.forward(proj, rows)) == 0


def test_torch_func_grad_equals_autograd(fused_cls_projection):
    """torch.func transforms reach the fused ops' autograd Functions (setup_context form)."""
    from torch.func import functional_call, grad
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    params = dict(model.named_parameters())
    got = grad(lambda p: functional_call(model, p, (x,)).square().sum())(params)
    model(x).square().sum().backward()
    for name, p in params.items():
        assert rel_err(got[name], p.grad) < FP32_PAIR_TOL, name


def test_runs_on_the_meta_device(fused_cls_projection):
    """Shape-only runs (meta tensors: model init, FLOP counting) work as in timm, forward and
    backward; autocast state is not queried on a device that has none."""
    model = small_model().to("meta")
    x = torch.randn(2, 3, 48, 48, device="meta")
    y = model(x)
    assert y.device.type == "meta" and y.shape == (2, model.num_classes)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_gradient_penalty_raises_on_the_fused_ops_and_runs_under_naive_math():
    """A second-order gradient (an input-gradient penalty) cannot go through the fused ops'
    backward: it raises with the way out, and under ``naive_math`` it runs."""
    model = small_model().double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, requires_grad=True)

    def penalty():
        g, = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), x)[0]
    with pytest.raises(RuntimeError, match="not differentiable.*naive_math"):
        penalty()
    # timm's math, with the SDPA kernel that has a double backward on the CPU
    with naive_math(), sdpa_kernel(SDPBackend.MATH):
        assert torch.isfinite(penalty()).all()


def test_branch_attention_backward_does_not_copy_the_qkv_gradient():
    """The branch blocks' attention gives timm's output and gradients bit for bit, and its
    backward stacks the q/k/v gradients straight into qkv's layout: no further copy (timm's
    permute costs one more pass over the qkv gradient per block)."""
    from torch.profiler import ProfilerActivity, profile

    from crossvit_fast import layers
    timm = import_timm()
    ours = layers.Attention(32, num_heads=4, qkv_bias=True)
    theirs = timm.models.vision_transformer.Attention(32, num_heads=4, qkv_bias=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 32)
    dy = torch.randn(2, 9, 32)
    grads = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = module(xi)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dx, = torch.autograd.grad(y, xi, dy)
        copies = sum(e.count for e in prof.key_averages() if e.key in ("aten::clone", "aten::copy_"))
        grads.append((y, dx, copies))
    (y, dx, copies), (y_timm, dx_timm, copies_timm) = grads
    assert torch.equal(y, y_timm) and torch.equal(dx, dx_timm)
    assert copies == 0 and copies_timm >= 1


def test_inference_writes_the_cls_token_in_place_with_the_same_result(fused_cls_projection):
    """In inference the exchanged CLS token is written over row 0 of the branch's fresh
    tokens instead of concatenated (a copy of every token): same logits and intermediates as
    with gradients on, where timm's concatenation runs."""
    from torch.profiler import ProfilerActivity, profile
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    counts, results = [], []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU]) as prof:
            logits = model(x)
            final, intermediates = model.forward_intermediates(x)
        counts.append(sum(e.count for e in prof.key_averages() if e.key == "aten::cat"))
        results.append([logits, *final, *intermediates])
    for with_grad, without in zip(*results):
        assert torch.equal(with_grad.detach(), without)
    # two forwards, one concatenation per branch per stage fewer each
    assert counts[0] - counts[1] == 2 * len(model.blocks) * model.num_branches, counts


def test_create_model_takes_the_model_defaults_from_the_pretrained_config():
    """As timm's builder: the config (a dict or tag, then the overlay) sets num_classes,
    in_chans and img_size unless given; out_indices without features_only is dropped."""
    model = create_model("crossvit_tiny_240", pretrained_cfg_overlay=dict(num_classes=5))
    assert model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
    model = create_model("crossvit_tiny_240", pretrained_cfg=dict(input_size=(1, 120, 120)),
                         num_classes=7, out_indices=(1, 2))
    assert (model.num_classes, model.in_chans, model.img_size) == (7, 1, (120, 120))
    assert model(torch.randn(1, 1, 120, 120)).shape == (1, 7)
    assert create_model("crossvit_tiny_240", pretrained_cfg="in1k").pretrained_cfg["tag"] == "in1k"
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        create_model("crossvit_tiny_240", pretrained_cfg="in21k")
    # negative num_classes in the config (timm train.py's --pretrained-path form) is not passed on
    model = create_model("crossvit_tiny_240", pretrained_cfg_overlay=dict(num_classes=-1))
    assert model.num_classes == 1000
