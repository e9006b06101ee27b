"""Attention maps of the whole model: ``forward_attention_maps`` and timm's own recipes (a forward
hook on ``attn_drop``, ``timm.utils.AttentionExtract(model, method="hook")``, ``fused_attn=False``
for the branch self-attention) give timm's maps, on every backend."""
import pytest
import torch
import torch.nn as nn

import crossvit_fast
from crossvit_fast import layers, ops
from crossvit_fast.reference import naive_math

from .conftest import backend_param
from .numerics import rel_err
from .test_model import small_model
from .test_timm_parity import no_tf32, pair
from .timm_import import import_timm

TOL = 1e-5  # fp32, relative to the largest weight of the map


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def extract(timm, model, x, **kwargs):
    with torch.no_grad():
        return timm.utils.AttentionExtract(model, method="hook", **kwargs)(x)


def assert_same_maps(got, expected):
    assert list(got) == list(expected)
    for name, m in expected.items():
        assert got[name].shape == m.shape, name
        assert rel_err(got[name], m) < TOL, name


def variant_on(name, backend):
    """A (variant, backend) pytest param that skips, with the reason, where the backend cannot run
    on CPU tensors."""
    marks = backend_param(backend, "cpu").marks
    return pytest.param(name, backend, id=f"{name}-{backend}", marks=marks)


# Triton (in the interpreter on CPU machines) on the smallest variant: a 240-pixel model there
# takes ~10 s; the PyTorch backend also on a variant with the dagger stem and 4 heads.
@pytest.mark.parametrize("name, backend", [
    variant_on("crossvit_tiny_240", "torch"), variant_on("crossvit_tiny_240", "triton"),
    variant_on("crossvit_9_dagger_240", "torch"),
])
def test_forward_attention_maps_equal_timms_hooked_maps(timm, name, backend):
    ref, ours = pair(timm, name)
    res = ref.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, res, res)
    expected = extract(timm, ref, x)
    assert len(expected) == 6          # 3 multi-scale blocks x 2 directions
    with torch.no_grad(), crossvit_fast.use_backend(backend):
        logits, maps = ours.forward_attention_maps(x)
        assert rel_err(logits, ref(x)) < TOL
    assert_same_maps(maps, expected)
    grids = [p.num_patches for p in ours.patch_embed]
    assert maps["blocks.0.fusion.0.attn.attn_drop"].shape == (1, ours.blocks[0].fusion[0].attn.num_heads, 1, 1 + grids[1])
    assert maps["blocks.0.fusion.1.attn.attn_drop"].shape[-1] == 1 + grids[0]


def test_timms_recipes_capture_timms_maps_from_our_model(timm):
    """AttentionExtract and a plain forward hook on attn_drop: the fused cross-attention steps
    aside for the hooked module, so the hooks see timm's maps, and the logits stay timm's."""
    ref, ours = pair(timm, "crossvit_9_240")
    x = torch.randn(2, 3, 240, 240)
    expected = extract(timm, ref, x)
    assert_same_maps(extract(timm, ours, x), expected)

    seen = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, out))
               for n, m in ours.named_modules() if n.endswith("fusion.0.attn.attn_drop")]
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < TOL
    for h in handles:
        h.remove()
    assert_same_maps(seen, {n: m for n, m in expected.items() if ".fusion.0." in n})


def test_branch_self_attention_maps_follow_fused_attn_as_in_timm(timm):
    ref, ours = pair(timm, "crossvit_tiny_240")
    x = torch.randn(1, 3, 240, 240)
    for model in (ref, ours):
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    expected = extract(timm, ref, x)
    assert len(expected) == 6 + 3 * (1 + 4)   # + every branch Block's self-attention
    assert_same_maps(extract(timm, ours, x), expected)
    for m in ours.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    with torch.no_grad():
        _, maps = ours.forward_attention_maps(x, branches=True)
    assert_same_maps(maps, expected)
    with torch.no_grad():
        _, maps = ours.forward_attention_maps(x)
    assert len(maps) == 6


def test_fused_attn_default_is_timms_setting(timm, monkeypatch):
    assert layers.Attention(8, 2).fused_attn == timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)
    try:
        assert layers.Attention(8, 2).fused_attn is False
    finally:
        timm.layers.set_fused_attn(True)
    monkeypatch.setitem(__import__("sys").modules, "timm.layers.config", None)
    monkeypatch.setenv("TIMM_FUSED_ATTN", "0")
    assert layers.Attention(8, 2).fused_attn is False


@pytest.mark.parametrize("backend", [backend_param("torch", "cpu"), backend_param("triton", "cpu")])
def test_fused_maps_equal_timms_math_in_float64(backend):
    """The maps of the fused path against those timm's math records (naive_math), in float64,
    and in fp32 against that float64 reference."""
    model = small_model().double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        with naive_math():
            logits_ref, expected = model.forward_attention_maps(x, branches=True)
        with crossvit_fast.use_backend(backend):
            logits, maps = model.forward_attention_maps(x, branches=True)
            assert rel_err(logits, model(x)) < 1e-12
            _, maps32 = model.float().forward_attention_maps(x.float(), branches=True)
    assert len(expected) == 3 * 2 + 3 * (1 + 2) and list(maps) == list(expected)
    for name, m in expected.items():
        assert maps[name].dtype == torch.float64
        assert rel_err(maps[name], m) < 1e-12, name
        assert maps32[name].dtype == torch.float32
        assert rel_err(maps32[name], m) < TOL, name
        assert torch.allclose(m.sum(-1), torch.ones((), dtype=m.dtype))
    assert rel_err(logits, logits_ref) < 1e-12


def test_maps_in_training_with_attention_dropout_are_the_dropout_input():
    """With dropout inside the attention timm's math runs; the maps are attn_drop's input."""
    model = small_model(attn_drop_rate=0.5).train()
    x = torch.randn(2, 3, 48, 48)
    seen = {}
    for n, m in model.named_modules():
        if n.endswith("attn.attn_drop") and ".fusion." in n:
            m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0]))
    logits, maps = model.forward_attention_maps(x)
    assert logits.requires_grad and list(maps) == list(seen)
    for n, m in maps.items():
        assert torch.equal(m, seen[n].detach()) and not m.requires_grad


def test_no_maps_are_made_unless_asked(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("maps computed in a plain forward")
    monkeypatch.setattr(ops, "cls_attention_maps", fail)
    model = small_model().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 48, 48))
    for name in ("torch", "triton"):
        if crossvit_fast.backends.unavailable_reason(name, "cpu") is None:
            monkeypatch.setattr(crossvit_fast.backends.implementation(name), "attn_weights", fail)
    with torch.no_grad():
        model(torch.randn(1, 3, 48, 48))


def test_a_replaced_cross_attention_says_its_maps_are_missing():
    class Other(nn.Module):
        def forward(self, x):
            return x[:, :1]
    model = small_model().eval()
    model.blocks[1].fusion[0].attn = Other()
    with pytest.raises(RuntimeError, match="blocks.1.fusion.0"):
        model.forward_attention_maps(torch.randn(1, 3, 48, 48))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_18_dagger_408"])
def test_gpu_maps_equal_timms_hooked_maps(timm, name, backend):
    """On the GPU, the compiled Triton kernel and the CUDA kernel: fp32 (tf32 off) within 1e-5 of
    timm's hooked maps in float64; under bf16 autocast within 4x timm's own bf16 error."""
    reason = crossvit_fast.backends.unavailable_reason(backend, "cuda")
    if reason:
        pytest.skip(reason)
    ref, ours = pair(timm, name)
    ref, ours = ref.cuda(), ours.cuda()
    res = ref.pretrained_cfg["input_size"][-1]
    x = torch.randn(4, 3, res, res, device="cuda")
    with no_tf32():
        expected = extract(timm, ref.double(), x.double())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            timm_bf16 = extract(timm, ref.float(), x)
        with torch.no_grad(), crossvit_fast.use_backend(backend):
            _, maps = ours.forward_attention_maps(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, maps_bf16 = ours.forward_attention_maps(x)
    assert list(maps) == list(expected) == list(maps_bf16)
    for n, m in expected.items():
        assert maps[n].dtype == torch.float32 and rel_err(maps[n], m) < TOL, n
        assert rel_err(maps_bf16[n], m) <= 4 * max(rel_err(timm_bf16[n], m), 1e-3), n


def test_branch_maps_with_gradient_checkpointing_backpropagate():
    """With branches=True the branch attentions form their matrix instead of calling SDPA; the
    checkpoints' recompute in the backward (outside forward_attention_maps) must take that path
    too (it took SDPA: CheckpointError, recomputed tensors of other metadata), and record nothing."""
    torch.manual_seed(0)
    model = small_model(attn_drop_rate=0.1, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 48, 48)
    torch.manual_seed(1)
    logits_ref, _ = model.forward_attention_maps(x, branches=True)
    logits_ref.sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    logits, maps = model.forward_attention_maps(x, branches=True)
    logits.sum().backward()
    assert len(maps) == 3 * 2 + 3 * (1 + 2) and torch.equal(logits, logits_ref)
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)


def test_recording_in_one_thread_leaves_other_threads_forwards_alone(monkeypatch):
    """The recording belongs to the thread that asked for the maps. A plain forward in another
    thread (a server answering requests beside a visualization) computed maps into that thread's
    dict, took the branch attentions off SDPA, and, when the recording ended between its check
    and its write, failed ('NoneType' object does not support item assignment)."""
    import threading

    import torch.nn.functional as F
    model = small_model().eval()
    x = torch.randn(1, 3, 48, 48)
    made, sdpa = [], []
    real_maps, real_sdpa = ops.cls_attention_maps, F.scaled_dot_product_attention
    monkeypatch.setattr(ops, "cls_attention_maps", lambda *a, **k: made.append(1) or real_maps(*a, **k))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa.append(1) or real_sdpa(*a, **k))
    outcome = []

    def plain_forward():
        try:
            with torch.no_grad():
                outcome.append(model(x))
        except Exception as err:  # noqa: BLE001 - reported below
            outcome.append(err)
    with layers.recording_attention_maps(branches=True) as maps:
        other = threading.Thread(target=plain_forward)
        other.start()
        other.join()
    assert isinstance(outcome[0], torch.Tensor), outcome[0]
    assert maps == {} and made == [], "the other thread's forward recorded maps"
    assert len(sdpa) == 3 * (1 + 2), "the other thread's branch attentions left SDPA"
    with torch.no_grad():   # and this thread's recording still works
        _, own = model.forward_attention_maps(x, branches=True)
    assert len(own) == 3 * 2 + 3 * (1 + 2)


def test_the_drawn_maps_are_each_fusions_first_block_over_the_patch_grid():
    """With two blocks in a fusion (timm chains the second on the CLS token alone), the map the
    attention command draws is the first block's, its patch columns (not the CLS one) laid out
    row by row on the other branch's grid; on a non-square grid, so a transposed layout fails."""
    from crossvit_fast.attention_viz import cls_maps_on_grids
    model = small_model(depth=((1, 2, 2),) * 3, img_size=(48, 96)).eval()
    with torch.no_grad():
        _, maps = model.forward_attention_maps(torch.randn(1, 3, 48, 96))
    grids = [embed.grid_size for embed in model.patch_embed]
    assert grids[0][0] != grids[0][1] and grids[1][0] != grids[1][1]
    for i, row in enumerate(cls_maps_on_grids(model, maps)):
        for d, drawn in enumerate(row):
            first = maps[f"blocks.{i}.fusion.{d}.0.attn.attn_drop"]
            assert torch.equal(drawn, first[0, :, 0, 1:].reshape(2, *grids[(d + 1) % 2]))


def test_the_drawn_maps_of_a_dynamic_size_model_follow_the_inputs_grid():
    """dynamic_img_size: the grids are the input's, given as image_size (was: the model's grid,
    so a 48x96 input drew as 4 'heads' of garbage on a 2x2 grid); without it, or for the wrong
    size, a ValueError naming the map and the grid (never a silent reshape)."""
    from crossvit_fast.attention_viz import cls_maps_on_grids
    model = small_model(dynamic_img_size=True).eval()
    with torch.no_grad():
        _, maps = model.forward_attention_maps(torch.randn(1, 3, 48, 96))
    grids = model.patch_grids((48, 96))
    assert grids == [(4, 8), (2, 4)] and model.patch_grids() == [(4, 4), (2, 2)]
    for i, row in enumerate(cls_maps_on_grids(model, maps, image_size=(48, 96))):
        for d, drawn in enumerate(row):
            first = maps[f"blocks.{i}.fusion.{d}.attn.attn_drop"]
            assert torch.equal(drawn, first[0, :, 0, 1:].reshape(2, *grids[(d + 1) % 2]))
    with pytest.raises(ValueError, match=r"has 8 patches; the patch grid 2x2 has 4 \(pass the input's image_size\)"):
        cls_maps_on_grids(model, maps)
    with pytest.raises(ValueError, match="has 8 patches; the patch grid 2x3 has 6"):
        cls_maps_on_grids(model, maps, image_size=(48, 72))


@pytest.mark.parametrize("where", ["autocast", "bf16 model"])
def test_the_fusions_maps_are_fp32_on_timms_path_too(where):
    """Where the fusion runs timm's math (here: training with attention dropout), its maps are
    fp32 as where it runs fused (was: bf16 under autocast and in a bf16 model); the branch
    maps stay in the dtype their attention computes in."""
    model = small_model(attn_drop_rate=0.1).train()
    x = torch.randn(2, 3, 48, 48)
    if where == "bf16 model":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "autocast"):
        _, maps = model.forward_attention_maps(x, branches=True)
    fusion = {n: m for n, m in maps.items() if ".fusion." in n}
    assert len(fusion) == 3 * 2
    assert all(m.dtype == torch.float32 for m in fusion.values()), {n: m.dtype for n, m in fusion.items()}
    assert all(m.dtype == torch.bfloat16 for n, m in maps.items() if n not in fusion)
    for m in fusion.values():   # softmax rows, before dropout
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=2e-2)
