"""Every backend's primitives against a float64 reference, forward and backward.

The float64 reference is the PyTorch backend evaluated on float64 copies of the inputs; it is
itself checked against autograd through the naive math (LayerNorm, softmax, K and V formed) to
1e-10 in ``test_torch_primitives_equal_autograd_of_naive_math``. Low-precision bars are set by
PyTorch's own error on the naive math in that dtype (tests/numerics.py).
"""
import pytest
import torch
import torch.nn.functional as F

from crossvit_fast import backends
from crossvit_fast.backends import torch_backend as ref

from .conftest import ALL_BACKENDS, DEVICE
from .numerics import assert_rel_close, rel_err, tolerance, torch_lowp_error

EPS = 1e-6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, N, C, H): odd N, N == 0, B == 1, widths that are not multiples of 16.
POOL_SHAPES = [(2, 13, 96, 3), (1, 7, 40, 2), (3, 0, 24, 2), (2, 33, 72, 4), (1, 50, 36, 1)]
ROW_SHAPES = [(5, 96), (1, 40), (7, 224), (3, 18)]
PROJ_SHAPES = [(2, 96, 192), (1, 40, 24), (3, 72, 36), (4, 224, 448)]


def naive_attn_pool(x0, patches, kt, gamma, beta):
    tokens = torch.cat([x0.unsqueeze(1), patches], dim=1)
    xhat = F.layer_norm(tokens, (tokens.shape[-1],), gamma, beta, EPS)
    scores = torch.einsum("bhc,bnc->bhn", kt, xhat)
    return torch.einsum("bhn,bnc->bhc", scores.softmax(-1), xhat), torch.logsumexp(scores, -1)


def naive_add_layer_norm(x, residual, weight, bias):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, EPS), h


def naive_cls_proj(x, ln_w, ln_b, w, b):
    return F.linear(F.gelu(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, EPS)), w, b)


def pool_inputs(B, N, C, H, dtype, device=DEVICE):
    tokens = torch.randn(B, N + 1, C, dtype=torch.float64, device=device)
    x0 = torch.randn(B, C, dtype=torch.float64, device=device)
    kt = torch.randn(B, H, C, dtype=torch.float64, device=device) / C ** 0.5
    gamma = 1 + 0.3 * torch.randn(C, dtype=torch.float64, device=device)
    beta = 0.3 * torch.randn(C, dtype=torch.float64, device=device)
    # patches arrive as the strided view tokens[:, 1:], as the model passes them
    return x0.to(dtype), tokens.to(dtype)[:, 1:], kt, gamma, beta


def f64(*ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


def test_torch_primitives_equal_autograd_of_naive_math():
    x0, patches, kt, gamma, beta = [t.requires_grad_() if t.is_leaf else t.detach().requires_grad_()
                                    for t in pool_inputs(2, 9, 20, 3, torch.float64)]
    z, lse = ref.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS)
    z_n, lse_n = naive_attn_pool(x0, patches, kt, gamma, beta)
    assert rel_err(z, z_n) < 1e-10 and rel_err(lse, lse_n) < 1e-10
    dz = torch.randn_like(z)
    grads = ref.attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z, lse, EPS)
    expected = torch.autograd.grad(z_n, (x0, patches, kt, gamma, beta), dz)
    for name, g, e in zip(("x0", "patches", "kt", "gamma", "beta"), grads, expected):
        assert rel_err(g, e) < 1e-10, name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_attn_pool(backend, dtype, shape):
    impl = backends.implementation(backend)
    x0, patches, kt, gamma, beta = pool_inputs(*shape, dtype)
    ref_in = f64(x0, patches, kt, gamma, beta)
    z_ref, lse_ref = ref.attn_pool_fwd(*ref_in, EPS)
    tol = tolerance(dtype, [torch_lowp_error(naive_attn_pool, ref_in, dtype)] if dtype != torch.float32 else [])

    z, lse = impl.attn_pool_fwd(x0, patches, kt.float(), gamma.float(), beta.float(), EPS)
    assert z.dtype == torch.float32 and lse.dtype == torch.float32
    assert_rel_close(z, z_ref, tol, f"{backend} z")
    assert_rel_close(lse, lse_ref, tol, f"{backend} lse")

    dz = torch.randn_like(z_ref)
    expected = ref.attn_pool_bwd(dz, *ref_in, z_ref, lse_ref, EPS)
    if dtype != torch.float32:
        naive_grads = lambda *a: torch.autograd.grad(  # noqa: E731
            naive_attn_pool(*a)[0], a, dz.to(a[0].dtype))
        tol = tolerance(dtype, [torch_lowp_error(naive_grads, [t.requires_grad_() for t in ref_in], dtype)])
    grads = impl.attn_pool_bwd(dz.float(), x0, patches, kt.float(), gamma.float(), beta.float(),
                               z, lse, EPS)
    for name, g, e in zip(("dx0", "dpatches", "dkt", "dgamma", "dbeta"), grads, expected):
        if name == "dkt" and shape[1] == 0:
            # One token: dkt is exactly 0, left as the rounding of dz·x̂ − dz·z (terms of size |dz||x̂|).
            cancelling = (dz.norm(dim=-1).max() * z_ref.norm(dim=-1).max()).item()
            assert g.abs().max().item() <= tol * cancelling, f"{backend} dkt with N=0"
            continue
        assert_rel_close(g, e, tol, f"{backend} {name}")
    assert grads[0].dtype == dtype and grads[1].dtype == dtype


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_layer_norm(backend, dtype, shape, with_residual):
    impl = backends.implementation(backend)
    M, C = shape
    x = torch.randn(M, C, device=DEVICE).to(dtype)
    res = torch.randn(M, C, device=DEVICE).to(dtype) if with_residual else None
    w = 1 + 0.3 * torch.randn(C, device=DEVICE)
    b = 0.3 * torch.randn(C, device=DEVICE)
    y_ref, h_ref, mean_ref, rstd_ref = ref.layer_norm_fwd(*f64(x, res, w, b), EPS)
    naive_in = f64(x, res if with_residual else torch.zeros_like(x), w, b)
    tol = tolerance(dtype, [torch_lowp_error(naive_add_layer_norm, naive_in, dtype)] if dtype != torch.float32 else [])

    y, h, mean, rstd = impl.layer_norm_fwd(x, res, w, b, EPS)
    assert y.dtype == dtype and h.dtype == dtype
    assert_rel_close(y, y_ref, tol, f"{backend} y")
    assert_rel_close(h, h_ref, tol, f"{backend} h")
    assert_rel_close(mean, mean_ref, tol, f"{backend} mean")
    assert_rel_close(rstd, rstd_ref, tol, f"{backend} rstd")

    dy = torch.randn(M, C, device=DEVICE, dtype=torch.float64)
    dh = torch.randn(M, C, device=DEVICE, dtype=torch.float64) if with_residual else None
    expected = ref.layer_norm_bwd(dy, dh, h_ref, w.double(), mean_ref, rstd_ref)
    grads = impl.layer_norm_bwd(dy.to(dtype), None if dh is None else dh.to(dtype), h, w, mean, rstd)
    for name, g, e in zip(("dx", "dweight", "dbias"), grads, expected):
        assert_rel_close(g, e, max(tol, tolerance(dtype, [2 * rel_err(dy.to(dtype), dy)])), f"{backend} {name}")
    assert grads[0].dtype == dtype


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_low_precision_x_onto_fp32_residual(backend, x_dtype):
    # Under autocast a bf16/fp16 branch output is added to the fp32 residual stream: h and y are
    # fp32, as for x + residual, and match the float64 reference at the fp32 bar (the only
    # rounding is x's own, which the reference sees too).
    impl = backends.implementation(backend)
    M, C = 37, 96
    x = torch.randn(M, C, device=DEVICE).to(x_dtype)
    res = torch.randn(M, C, device=DEVICE)
    w, b = 1 + 0.3 * torch.randn(C, device=DEVICE), 0.3 * torch.randn(C, device=DEVICE)
    y_ref, h_ref, mean_ref, rstd_ref = ref.layer_norm_fwd(*f64(x, res, w, b), EPS)
    y, h, mean, rstd = impl.layer_norm_fwd(x, res, w, b, EPS)
    assert y.dtype == h.dtype == torch.float32
    for name, got, want in (("y", y, y_ref), ("h", h, h_ref), ("mean", mean, mean_ref), ("rstd", rstd, rstd_ref)):
        assert_rel_close(got, want, 1e-5, f"{backend} {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("x_dtype, out_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),   # fp32 stream, autocast
    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.float64)], ids=str)              # (the ops take float64 out too)
@pytest.mark.parametrize("C", [96, 98], ids=["C96", "C98"])    # 16-byte chunks, element stores
def test_layer_norm_out_dtype_rounds_once(backend, x_dtype, out_dtype, C):
    """``y`` written in ``out_dtype`` is the fp32 result rounded once to it (not first to the
    activation dtype), in the same call; ``h`` stays in the activation dtype."""
    impl = backends.implementation(backend)
    x, res = (torch.randn(37, C, device=DEVICE).to(x_dtype) for _ in range(2))
    w, b = 1 + 0.3 * torch.randn(C, device=DEVICE), 0.3 * torch.randn(C, device=DEVICE)
    y32, h32, _, _ = impl.layer_norm_fwd(x, res, w, b, EPS, torch.float32)
    y, h, _, _ = impl.layer_norm_fwd(x, res, w, b, EPS, out_dtype)
    assert y.dtype == out_dtype and h.dtype == x_dtype and torch.equal(h, h32)
    if backend == "triton" and DEVICE == "cpu" and out_dtype == torch.bfloat16:
        # Triton's interpreter truncates fp32 to bf16 (compiled Triton rounds to nearest even)
        assert ((y.float() - y32) / y32.abs().clamp(min=1e-3)).abs().max() <= 2 ** -7
    else:
        assert torch.equal(y, y32.to(out_dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("h_dtype, dy_dtype, scale", [
    (torch.float16, torch.bfloat16, 1e-9),    # below fp16's smallest subnormal (6e-8)
    (torch.float16, torch.float32, 1e-9),
    (torch.float16, torch.bfloat16, 1e6),     # past fp16's largest value (65504)
    (torch.bfloat16, torch.float32, 1.0)], ids=str)   # fp32 digits past bf16's
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")   # dx past fp16
def test_layer_norm_backward_keeps_a_gradient_of_another_dtype(backend, h_dtype, dy_dtype, scale):
    """A 16-bit norm whose output was written in another dtype (an fp16 model under bf16
    autocast) gets gradients in that dtype: the weight and bias gradients (fp32) are computed
    from them as they are, not rounded to h's dtype first (which would flush or overflow)."""
    impl = backends.implementation(backend)
    M, C = 6, 40
    h = torch.randn(M, C, device=DEVICE).to(h_dtype)
    w, b = 1 + 0.3 * torch.randn(C, device=DEVICE), 0.3 * torch.randn(C, device=DEVICE)
    _, _, mean, rstd = impl.layer_norm_fwd(h, None, w, b, EPS)
    dy = (scale * torch.randn(M, C, device=DEVICE)).to(dy_dtype)
    dx, dweight, dbias = impl.layer_norm_bwd(dy, None, h, w, mean, rstd)
    dx_ref, dweight_ref, dbias_ref = ref.layer_norm_bwd(*f64(dy, None, h, w, mean, rstd))
    assert dx.dtype == h_dtype
    rounded = dx_ref.to(h_dtype)   # dx is written in h's dtype: at most one rounding off it
    finite = rounded.isfinite()
    assert torch.equal(dx.isfinite(), finite)
    ulp = torch.finfo(h_dtype).eps * rounded.double().abs() + torch.finfo(h_dtype).smallest_normal
    assert ((dx.double() - dx_ref).abs()[finite] <= ulp[finite]).all(), f"{backend} dx"
    assert_rel_close(dweight, dweight_ref, 1e-5, f"{backend} dweight")
    assert_rel_close(dbias, dbias_ref, 1e-5, f"{backend} dbias")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=str)
def test_cls_proj(backend, dtype, shape):
    impl = backends.implementation(backend)
    M, cin, cout = shape
    tokens = torch.randn(M, 3, cin, device=DEVICE).to(dtype)
    x = tokens[:, 0]                                   # a strided row view, as the model passes it
    ln_w = 1 + 0.3 * torch.randn(cin, device=DEVICE)
    ln_b = 0.3 * torch.randn(cin, device=DEVICE)
    w = torch.randn(cout, cin, device=DEVICE) / cin ** 0.5
    b = 0.1 * torch.randn(cout, device=DEVICE)
    ref_in = f64(x, ln_w, ln_b, w, b)
    y_ref, mean_ref, rstd_ref = ref.cls_proj_fwd(*ref_in, EPS)
    tol = tolerance(dtype, [torch_lowp_error(naive_cls_proj, ref_in, dtype)] if dtype != torch.float32 else [])

    y, mean, rstd = impl.cls_proj_fwd(x, ln_w, ln_b, w, b, EPS)
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, tol, f"{backend} y")

    dy = torch.randn(M, cout, device=DEVICE, dtype=torch.float64)
    expected = ref.cls_proj_bwd(dy, *ref_in[:4], mean_ref, rstd_ref)
    if dtype != torch.float32:
        naive_grads = lambda *a: torch.autograd.grad(naive_cls_proj(*a), a, dy.to(a[0].dtype))  # noqa: E731
        tol = tolerance(dtype, [torch_lowp_error(naive_grads, [t.requires_grad_() for t in ref_in], dtype)])
    grads = impl.cls_proj_bwd(dy.to(dtype), x, ln_w, ln_b, w, mean, rstd)
    for name, g, e in zip(("dx", "dln_weight", "dln_bias", "dweight", "dbias"), grads, expected):
        assert_rel_close(g, e, tol, f"{backend} {name}")
    assert grads[0].dtype == dtype
