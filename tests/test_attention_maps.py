"""CLS attention maps: the ``attn_weights`` primitive of every backend against a float64
reference, and the op that runs it after the forward token pass.

The reference is timm's math in float64: LayerNorm the tokens ``[x0 ‖ patches]``, score them
against ``kt`` and softmax (K never matters past ``kt``: design.md §2). Each backend's maps are
made as the model makes them: its own forward token pass gives ``lse``, then its ``attn_weights``.
"""
import pytest
import torch
import torch.nn.functional as F

from crossvit_fast import backends, ops, reference

from .conftest import ALL_BACKENDS, DEVICE
from .numerics import assert_rel_close, rel_err, tolerance, torch_lowp_error
from .test_primitives import DTYPES, EPS, POOL_SHAPES, f64, pool_inputs


@pytest.fixture(autouse=True)
def gpu_plan(monkeypatch):
    """The token pass planned as on a GPU (channel tiles, token groups, splits), not as the
    interpreter's whole-row plan: the tiling is what these tests check."""
    try:
        from crossvit_fast.kernels import attn_pool
    except ImportError:     # no Triton: nothing to plan
        return
    monkeypatch.setattr(attn_pool, "GPU_PLAN_ON_CPU", True)


def naive_attn_weights(x0, patches, kt, gamma, beta):
    tokens = torch.cat([x0.unsqueeze(1), patches], dim=1)
    xhat = F.layer_norm(tokens, (tokens.shape[-1],), gamma, beta, EPS)
    return torch.einsum("bhc,bnc->bhn", kt, xhat).softmax(-1)


def backend_maps(impl, x0, patches, kt, gamma, beta, **kwargs):
    _, lse = impl.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS, **kwargs)
    return impl.attn_weights(x0, patches, kt, gamma, beta, lse, EPS, **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_attn_weights(backend, dtype, shape):
    impl = backends.implementation(backend)
    x0, patches, kt, gamma, beta = pool_inputs(*shape, dtype)
    ref_in = f64(x0, patches, kt, gamma, beta)
    expected = naive_attn_weights(*ref_in)
    tol = tolerance(dtype, [torch_lowp_error(naive_attn_weights, ref_in, dtype)] if dtype != torch.float32 else [])
    got = backend_maps(impl, x0, patches, kt.float(), gamma.float(), beta.float())
    assert got.dtype == torch.float32
    assert_rel_close(got, expected, tol, f"{backend} maps")
    # the rows are the forward pass's softmax: they sum to 1
    assert (got.double().sum(-1) - 1).abs().max().item() <= tol


def test_torch_attn_weights_given_the_exact_lse_equal_the_softmax_in_float64():
    x0, patches, kt, gamma, beta = pool_inputs(2, 9, 20, 3, torch.float64)
    _, lse = backends.implementation("torch").attn_pool_fwd(x0, patches, kt, gamma, beta, EPS)
    got = backends.implementation("torch").attn_weights(x0, patches, kt, gamma, beta, lse, EPS)
    assert rel_err(got, naive_attn_weights(x0, patches, kt, gamma, beta)) < 1e-12


def op_inputs(B, N, C, H, dtype=torch.float32, qkv_bias=True):
    tokens = torch.randn(B, N + 1, C, device=DEVICE, dtype=dtype)
    cls = torch.randn(B, 1, C, device=DEVICE, dtype=dtype)
    params = dict(
        norm_weight=1 + 0.3 * torch.randn(C, device=DEVICE), norm_bias=0.3 * torch.randn(C, device=DEVICE),
        wq_weight=torch.randn(C, C, device=DEVICE) / C ** 0.5,
        wq_bias=0.1 * torch.randn(C, device=DEVICE) if qkv_bias else None,
        wk_weight=torch.randn(C, C, device=DEVICE) / C ** 0.5)
    return cls, tokens[:, 1:], params


def timm_maps(cls, patches, params, num_heads, scale):
    """timm's CrossAttention up to attn_drop, K formed, captured where timm's hook would."""
    captured = []
    C = cls.shape[-1]
    x = F.layer_norm(torch.cat([cls, patches], dim=1), (C,), params["norm_weight"], params["norm_bias"], EPS)
    reference.cross_attention(
        x, reference.linear(params["wq_weight"], params["wq_bias"]),
        reference.linear(params["wk_weight"], torch.randn(C, dtype=x.dtype, device=x.device)),
        reference.linear(torch.eye(C, dtype=x.dtype, device=x.device), None), lambda t: t,
        num_heads, scale, attn_drop=lambda a: captured.append(a) or a)
    return captured[0]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["bias", "no_bias"])
def test_op_equals_timms_attn_drop_input(backend, qkv_bias):
    B, N, C, H = 2, 37, 72, 3
    cls, patches, params = op_inputs(B, N, C, H, qkv_bias=qkv_bias)
    scale = (C // H) ** -0.5
    expected = timm_maps(*f64(cls, patches), {k: None if v is None else v.double() for k, v in params.items()}, H, scale)
    got = ops.cls_attention_maps(cls, patches, **params, num_heads=H, scale=scale, eps=EPS, backend=backend)
    assert got.shape == (B, H, 1, N + 1) and got.dtype == torch.float32
    assert not got.requires_grad
    assert_rel_close(got, expected, 1e-5, f"{backend} maps")


def test_op_takes_no_gradient_and_leaves_its_inputs_alone():
    cls, patches, params = op_inputs(2, 5, 24, 2)
    params = {k: v.requires_grad_() for k, v in params.items()}
    maps = ops.cls_attention_maps(cls.requires_grad_(), patches, **params, num_heads=2, scale=0.25)
    assert not maps.requires_grad and maps.grad_fn is None


def test_op_under_autocast_uses_the_token_passs_dot_dtype(monkeypatch):
    impl = backends.implementation("torch")
    seen = []
    for name in ("attn_pool_fwd", "attn_weights"):
        original = getattr(impl, name)
        monkeypatch.setattr(impl, name, lambda *a, _f=original, _n=name, **k: seen.append((_n, a[-1])) or _f(*a, **k))
    cls, patches, params = op_inputs(2, 5, 24, 2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ops.cls_attention_maps(cls, patches, **params, num_heads=2, scale=0.25, backend="torch")
    assert seen == [("attn_pool_fwd", torch.bfloat16), ("attn_weights", torch.bfloat16)]


@pytest.mark.parametrize("bad, match", [
    (dict(cls=torch.zeros(2, 2, 24)), "cls must be"),
    (dict(patches=torch.zeros(3, 5, 24)), "patches must be"),
    (dict(num_heads=5), "num_heads"),
    (dict(wq_weight=torch.zeros(24, 12)), "wq_weight must be"),
    (dict(norm_bias=torch.zeros(7)), "norm_bias"),
])
def test_op_names_the_bad_argument(bad, match):
    cls, patches, params = op_inputs(2, 5, 24, 2)
    args = dict(cls=cls, patches=patches, **params, num_heads=2, scale=0.25)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in bad.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        ops.cls_attention_maps(**args)


@pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                    reason=str(backends.unavailable_reason("triton", DEVICE)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_triton_kernel_launches_over_several_token_tiles(dtype):
    """The Triton kernel itself runs (the forward's scores kernel), over several programs per
    sample, with odd strides (a kt view, patches inside a wider buffer); float64 inputs stay
    float64."""
    from unittest import mock

    from crossvit_fast.kernels import attn_pool as kernels
    B, N, C, H = 2, 70, 40, 3
    x0, _, _, gamma, beta = pool_inputs(B, N, C, H, dtype)
    patches = torch.randn(B, N, C + 8, dtype=dtype, device=DEVICE)[..., 3:C + 3]
    kt_view = torch.randn(H, B, C, dtype=torch.float64, device=DEVICE).transpose(0, 1)
    grids = []
    kernel = kernels._scores_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return kernel[grid]
    impl = backends.implementation("triton")
    with mock.patch.object(kernels, "_scores_kernel", Spy()):
        got = backend_maps(impl, x0, patches, kt_view, gamma, beta)
    # the forward's scores and then the maps: the same kernel, the same grid
    assert len(grids) == 2 and grids[0] == grids[1] and grids[1][0] == B and grids[1][1] >= 3
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = naive_attn_weights(*f64(x0, patches, kt_view, gamma, beta))
    assert_rel_close(got, expected, 1e-12 if dtype == torch.float64 else 1e-5, "triton maps")
