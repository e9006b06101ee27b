"""PatchEmbed's patch-tiling conv run as patchify + GEMM, against the conv itself in float64."""
import pytest
import torch
import torch.nn.functional as F

from crossvit_fast.layers import PatchEmbed, patchify_linear
from crossvit_fast.reference import naive_math

from .conftest import DEVICE
from .numerics import FP32_REL_TOL, LOWP_FLOOR, rel_err


def conv_reference(x, embed):
    """What timm's PatchEmbed computes, in float64."""
    w, b = embed.proj.weight.double(), embed.proj.bias.double()
    return F.conv2d(x.double(), w, b, stride=embed.proj.stride).flatten(2).transpose(1, 2)


# (image H, W), patch: whole patches, and sizes with rows and columns past the last patch
@pytest.mark.parametrize("img, patch", [((24, 36), 12), ((50, 38), 12), ((33, 16), 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patchify_equals_the_strided_conv_forward_and_backward(img, patch, dtype):
    embed = PatchEmbed(img_size=img, patch_size=patch, in_chans=3, embed_dim=20).to(DEVICE, dtype)
    x = torch.randn(2, 3, *img, device=DEVICE, dtype=dtype, requires_grad=True)
    out = embed(x)
    assert out.shape == (2, (img[0] // patch) * (img[1] // patch), 20) and out.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    w64 = embed.proj.weight.detach().double().requires_grad_()
    b64 = embed.proj.bias.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, b64, stride=patch).flatten(2).transpose(1, 2)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    tol = 1e-12 if dtype == torch.float64 else FP32_REL_TOL
    for name, got, want in [("out", out, ref), ("dx", x.grad, x64.grad),
                            ("dweight", embed.proj.weight.grad, w64.grad),
                            ("dbias", embed.proj.bias.grad, b64.grad)]:
        assert rel_err(got, want) <= tol, f"{name}: {rel_err(got, want):.2e} > {tol:.0e}"


def test_patchify_under_autocast_gives_the_autocast_dtype_like_the_conv():
    embed = PatchEmbed(img_size=(48, 48), patch_size=16, embed_dim=32).to(DEVICE)
    x = torch.randn(3, 3, 48, 48, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = embed(x)
        conv_out = embed.proj(x).flatten(2).transpose(1, 2)
    assert out.dtype == conv_out.dtype == torch.bfloat16
    ref = conv_reference(x, embed)
    assert rel_err(out, ref) <= LOWP_FLOOR[torch.bfloat16]


def _count_conv_calls(embed):
    """Count calls of the conv module's forward (a hook would change the path under test)."""
    calls, conv_forward = [], embed.proj.forward
    embed.proj.forward = lambda x: calls.append(1) or conv_forward(x)
    return calls


def test_plain_conv_is_not_called_but_a_hooked_or_naive_one_is():
    embed = PatchEmbed(img_size=(24, 24), patch_size=12, embed_dim=8).to(DEVICE)
    x = torch.randn(1, 3, 24, 24, device=DEVICE)
    calls = _count_conv_calls(embed)
    embed(x)
    assert calls == [], "the patch-tiling conv should run as patchify + GEMM"
    with naive_math():
        embed(x)
    assert calls == [1], "naive_math runs timm's conv"
    hooked = []
    embed.proj.register_forward_hook(lambda *args: hooked.append(1))
    embed(x)
    assert calls == [1, 1] and hooked == [1], "a forward hook on the conv must fire"


def test_patchify_linear_rejects_nothing_the_conv_accepts():
    """A channel count the conv does not take goes to the conv, whose error names it."""
    embed = PatchEmbed(img_size=(24, 24), patch_size=12, embed_dim=8).to(DEVICE)
    with pytest.raises(RuntimeError, match="channels"):
        embed(torch.randn(1, 4, 24, 24, device=DEVICE))
    assert patchify_linear(torch.randn(1, 3, 24, 24, device=DEVICE), embed.proj).shape == (1, 4, 8)
