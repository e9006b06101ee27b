"""Modules that a user hooks, wraps or quantizes run as in timm: the fused paths step aside.

A fused op reads the parameters of several modules at once and skips their ``forward``; where
a hook, a wrapper (LoRA-style) or a quantized module sits on one of them, the model must call
the modules as timm does instead, and give timm's result.
"""
import pytest
import torch
import torch.nn as nn

from crossvit_fast.reference import naive_math

from .numerics import rel_err
from .test_model import small_model


class ScaledLinear(nn.Module):
    """A LoRA-like wrapper: exposes ``weight``/``bias`` but computes something else."""

    def __init__(self, linear: nn.Linear, factor: float):
        super().__init__()
        self.linear, self.factor = linear, factor
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return self.linear(x) * self.factor


def count_calls(module: nn.Module, calls: list, name: str):
    return module.register_forward_hook(lambda m, args, out: calls.append((name, [a.shape for a in args])))


def test_hooks_on_fusion_submodules_fire_and_leave_the_output_alone(fused_cls_projection):
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        plain = model(x)
    fusion = model.blocks[0].fusion[0]
    calls = []
    handles = [count_calls(m, calls, n) for n, m in (
        ("norm1", fusion.norm1), ("attn", fusion.attn), ("wq", fusion.attn.wq), ("wk", fusion.attn.wk),
        ("wv", fusion.attn.wv), ("proj", fusion.attn.proj), ("proj_drop", fusion.attn.proj_drop),
        ("drop_path", fusion.drop_path), ("block_norm1", model.blocks[0].blocks[0][0].norm1),
        ("cls_proj_linear", model.blocks[0].projs[0][2]))]
    with torch.no_grad():
        hooked = model(x)
    for h in handles:
        h.remove()
    assert sorted(n for n, _ in calls) == sorted(
        ["norm1", "attn", "wq", "wk", "wv", "proj", "proj_drop", "drop_path", "block_norm1",
         "cls_proj_linear"])
    assert rel_err(hooked, plain) < 1e-5


@pytest.mark.parametrize("name", ["norm1", "attn.attn_drop", "attn.proj_drop", "drop_path"])
def test_a_hook_on_one_fusion_submodule_alone_fires(name, fused_cls_projection):
    """Hooked by itself (nothing else in the block hooked), the module still runs."""
    model = small_model().eval()
    calls = []
    count_calls(model.blocks[1].fusion[0].get_submodule(name), calls, name)
    with torch.no_grad():
        model(torch.randn(2, 3, 48, 48))
    assert [n for n, _ in calls] == [name]


def test_a_hooked_fusion_block_sees_timms_concatenated_tokens():
    model = small_model().eval()
    fusion = model.blocks[0].fusion[0]
    calls = []
    count_calls(fusion, calls, "fusion")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        model(x)
    (_, shapes), = calls
    assert len(shapes) == 1 and shapes[0][1] > 1, f"one [B, 1 + N, C] input expected, got {shapes}"


def test_a_wrapped_projection_is_used_as_timm_would():
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        plain = model(x)
        attn = model.blocks[0].fusion[0].attn
        attn.wv = ScaledLinear(attn.wv, 0.0)
        wrapped = model(x)
        with naive_math():
            expected = model(x)                      # timm's math, calling the wrapper
    assert rel_err(wrapped, expected) < 1e-5
    assert rel_err(wrapped, plain) > 1e-3, "the wrapper's change must show"


@pytest.mark.skipif(not hasattr(torch.ao.quantization, "quantize_dynamic"),
                    reason="this torch has no eager dynamic quantization")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_dynamically_quantized_model_runs():
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        assert rel_err(quantized(x), model(x)) < 0.1


@pytest.mark.parametrize("where", ["last_block_output", "cls_projection_input", "skipped_block"])
def test_tensors_a_hook_keeps_are_not_overwritten_in_inference(where):
    """Inference writes the exchanged CLS token in place only into tokens nobody else holds:
    a tensor a hook kept (a block's output, the CLS projection's input view, a stage input
    passed through by a skipping hook) keeps the values it had when the hook saw it."""
    model = small_model().eval()
    stage = model.blocks[0]
    kept = []

    def keep(t):
        kept.append((t, t.clone()))
    if where == "last_block_output":
        stage.blocks[0][-1].register_forward_hook(lambda m, args, out: keep(out))
    elif where == "cls_projection_input":
        stage.projs[0].register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:  # a hook that skips the branch's first block: the stage input goes through
        stage.blocks[0][0].register_forward_hook(lambda m, args, out: keep(args[0]) or args[0])
    with torch.no_grad():
        model(torch.randn(2, 3, 48, 48))
    assert kept and all(torch.equal(t, at_hook_time) for t, at_hook_time in kept)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "grad_checkpointing"])
def test_torch_func_transforms_run_timms_math_per_sample_gradients(fused_cls_projection, checkpointing):
    """Under ``torch.func`` (vmap, grad: per-sample gradients) the fused ops' Functions and
    kernels step aside for timm's math (was: "You tried to vmap over AttnPoolFunction"): each
    sample's gradients equal a plain backward over that sample alone. With gradient
    checkpointing on, the blocks run without it there (torch's checkpoint raised under the
    transforms)."""
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    model = small_model().eval()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(3, 3, 48, 48)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, sample):
        return functional_call(model, p, (sample.unsqueeze(0),)).square().mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        model.zero_grad()
        model(x[i:i + 1]).square().mean().backward()
        for name, p in model.named_parameters():
            assert rel_err(per_sample[name][i], p.grad) < 1e-5, (i, name)
    with torch.no_grad():
        assert rel_err(vmap(model)(x.unsqueeze(1)).squeeze(1), model(x)) < 1e-5


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@pytest.mark.parametrize("name", ["q_norm", "k_norm", "norm"])
def test_the_branch_attentions_identity_slots_are_called_as_timm_calls_them(name):
    """timm's Attention calls ``q_norm`` and ``k_norm`` on q and k and ``norm`` before ``proj``
    (Identity in CrossViT): a module put there, or a hook on one, acts in this model too."""
    from .timm_import import import_timm
    timm = import_timm()
    import crossvit_fast
    torch.manual_seed(0)
    reference = timm.create_model("crossvit_tiny_240").eval()
    model = crossvit_fast.create_model("crossvit_tiny_240").eval()
    model.load_state_dict(reference.state_dict())
    for m in (reference, model):
        setattr(m.blocks[0].blocks[1][0].attn, name, Scale(3.))
    calls = []
    model.blocks[1].blocks[0][0].attn.get_submodule(name).register_forward_hook(
        lambda *args: calls.append(1))
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        expected = reference(x)
        assert rel_err(model(x), expected) < 1e-5
    assert calls == [1]
