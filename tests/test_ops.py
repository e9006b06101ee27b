"""The fused custom ops against the naive reference (timm's math), forward and every gradient."""
import numpy as np
import pytest
import torch

from crossvit_fast import backends, ops, reference
from crossvit_fast.backends import BackendUnavailableError

from .conftest import ALL_BACKENDS, DEVICE
from .numerics import (FP32_PAIR_TOL, FP32_REL_TOL, assert_rel_close, rel_err, tolerance,
                       torch_lowp_error)

# (B, N, C, H, qkv_bias): odd N, B == 1, N == 0, C not a multiple of 16, head dims 32/64 and others.
CROSS_SHAPES = [(2, 13, 96, 3, True), (1, 7, 40, 2, False), (3, 0, 24, 2, True), (2, 9, 128, 2, True),
                (1, 21, 36, 3, True)]


def cross_inputs(B, N, C, H, qkv_bias, dtype=torch.float64, device=DEVICE):
    """CLS token [B, 1, C], patches as the view tokens[:, 1:], and timm-like parameters."""
    g = lambda *s, scale=1.0: (scale * torch.randn(*s, dtype=torch.float64)).to(device)  # noqa: E731
    tokens = g(B, N + 1, C).to(dtype)
    params = dict(norm_weight=1 + g(C, scale=0.2), norm_bias=g(C, scale=0.2))
    for name in ("wq", "wk", "wv", "proj"):
        params[f"{name}_weight"] = g(C, C, scale=C ** -0.5)
        params[f"{name}_bias"] = g(C, scale=0.1) if (qkv_bias or name == "proj") else None
    return g(B, 1, C).to(dtype), tokens[:, 1:], params, dict(num_heads=H, scale=(C // H) ** -0.5)


def leaves(cls, patches, params):
    """Fresh leaf copies requiring grad, in the order (cls, patches, *present params)."""
    out = [cls.detach().clone().requires_grad_(), patches.detach().clone().requires_grad_()]
    named = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in params.items()}
    return out[0], out[1], named


def grads_of(y, dy, cls, patches, params):
    wrt = [cls, patches] + [v for v in params.values() if v is not None]
    return torch.autograd.grad(y, wrt, dy, allow_unused=False)


@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=str)
@pytest.mark.parametrize("add_residual", [True, False])
def test_absorbed_cross_attention_equals_naive_in_float64(shape, add_residual):
    cls, patches, params, cfg = cross_inputs(*shape)
    c1, p1, w1 = leaves(cls, patches, params)
    c2, p2, w2 = leaves(cls, patches, params)
    y = ops.cls_cross_attention(c1, p1, **w1, **cfg, add_residual=add_residual, backend="torch")
    y_ref = reference.cls_cross_attention(c2, p2, **w2, **cfg, add_residual=add_residual)
    assert y.shape == cls.shape and y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-10
    dy = torch.randn_like(y)
    names = ["cls", "patches"] + [k for k, v in params.items() if v is not None]
    for name, g, e in zip(names, grads_of(y, dy, c1, p1, w1), grads_of(y_ref, dy, c2, p2, w2)):
        assert rel_err(g, e) < 1e-10, f"d{name}: {rel_err(g, e):.2e}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", CROSS_SHAPES[:3], ids=str)
def test_cross_attention_op_each_backend(backend, dtype, shape):
    """The whole op (small products + the backend's token pass) against float64 naive math."""
    cls, patches, params, cfg = cross_inputs(*shape)
    c_ref, p_ref, w_ref = leaves(cls, patches, params)
    y_ref = reference.cls_cross_attention(c_ref, p_ref, **w_ref, **cfg)
    dy = torch.randn_like(y_ref)
    expected = grads_of(y_ref, dy, c_ref, p_ref, w_ref)

    low = {k: (v.float() if v is not None else None) for k, v in params.items()}
    c, p, w = leaves(cls.to(dtype), patches.to(dtype), low)
    y = ops.cls_cross_attention(c, p, **w, **cfg, backend=backend)
    got = grads_of(y, dy.to(dtype), c, p, w)
    tol = tolerance(dtype)
    if dtype != torch.float32:
        names = [k for k, v in params.items() if v is not None]
        naive = lambda cl, pa, *ws: reference.cls_cross_attention(  # noqa: E731
            cl, pa, **dict(params, **dict(zip(names, ws))), **cfg)
        tol = tolerance(dtype, [torch_lowp_error(naive, [cls, patches] + [params[k] for k in names], dtype)])
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, tol, f"{backend} y")
    names = ["cls", "patches"] + [k for k, v in params.items() if v is not None]
    for name, g, e in zip(names, got, expected):
        if shape[1] == 0 and name in ("wq_weight", "wq_bias", "wk_weight"):
            # one token: softmax ignores the query, these are exactly 0 up to rounding of O(1) terms
            assert g.abs().max().item() <= 10 * tol, f"{backend} d{name} with N=0"
            continue
        # parameters stay fp32 here; gradients through low-precision activations get the dtype's bar
        assert_rel_close(g, e, max(tol, tolerance(dtype, [])), f"{backend} d{name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_cross_attention_reads_cls_rows_of_any_layout(backend):
    """A CLS token ``[B, C]`` stored column-major (its last dim strided), fp32: every backend
    gives the float64 reference's output and gradients (the CUDA kernels read unit-stride rows:
    its backend makes them; its binding refused such a token before)."""
    B, N, C, H = 3, 5, 24, 2
    cls, patches, params, cfg = cross_inputs(B, N, C, H, True)
    c_ref, p_ref, w_ref = leaves(cls, patches, params)
    y_ref = reference.cls_cross_attention(c_ref, p_ref, **w_ref, **cfg).reshape(B, C)
    dy = torch.randn_like(y_ref)
    low = {k: (v.float() if v is not None else None) for k, v in params.items()}
    column_major = cls.reshape(B, C).float().t().contiguous().t()
    assert column_major.stride(-1) != 1
    c, p, w = leaves(column_major, patches.float(), low)
    y = ops.cls_cross_attention(c, p, **w, **cfg, backend=backend)
    assert_rel_close(y, y_ref, FP32_REL_TOL, f"{backend} y")
    for g, e in zip(grads_of(y, dy.float(), c, p, w), grads_of(y_ref, dy, c_ref, p_ref, w_ref)):
        assert_rel_close(g.reshape(e.shape), e, FP32_REL_TOL, f"{backend} gradient")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_broadcast_gradients_are_accepted(backend, dtype):
    """``loss = out.sum()`` hands each op's backward a stride-0 view; every backend must take it
    and give the gradients of a dense copy of it."""
    B, N, C, H = 2, 7, 40, 2
    tokens = torch.randn(B, N + 1, C, device=DEVICE).to(dtype)
    nw, nb = 1 + 0.1 * torch.randn(C, device=DEVICE), 0.1 * torch.randn(C, device=DEVICE)
    proj_w, proj_b = torch.randn(C // 2, C, device=DEVICE) / C ** 0.5, torch.zeros(C // 2, device=DEVICE)
    attn_w = [(torch.randn(C, C, device=DEVICE) / C ** 0.5).to(dtype) for _ in range(4)]

    def grads(reduce):
        x = tokens.clone().requires_grad_()
        y, h = ops.add_layer_norm(x, x * 0.5, nw, nb, backend=backend)
        z = ops.cls_projection(x[:, 0], nw, nb, proj_w, proj_b, backend=backend)
        t = ops.layer_norm(x, nw, nb, backend=backend)
        c = ops.cls_cross_attention(x[:, 0:1], x[:, 1:], nw.to(dtype), nb.to(dtype), attn_w[0], None,
                                    attn_w[1], None, attn_w[2], None, attn_w[3], None, H,
                                    (C // H) ** -0.5, backend=backend)
        reduce(y.float() + h.float() + t.float()).backward(retain_graph=True)
        reduce(z.float()).backward(retain_graph=True)
        reduce(c.float()).backward()
        return x.grad.float()

    broadcast = grads(lambda out: out.sum())
    dense = grads(lambda out: (out * torch.ones_like(out).contiguous()).sum())
    assert torch.isfinite(broadcast).all()
    assert rel_err(broadcast, dense) < tolerance(dtype), backend


def test_wk_bias_gets_an_exact_zero_gradient():
    cls, patches, params, cfg = cross_inputs(2, 5, 24, 2, True)
    c, p, w = leaves(cls, patches, params)
    ops.cls_cross_attention(c, p, **w, **cfg).sum().backward()
    assert w["wk_bias"].grad is not None and torch.count_nonzero(w["wk_bias"].grad) == 0


def _op_and_inputs(op, backend="torch"):
    """A call of the public op ``op`` on ``backend`` and fresh float64 inputs for it."""
    d = dict(dtype=torch.float64, device=DEVICE)
    if op == "cross_attention":
        cls, patches, params, cfg = cross_inputs(2, 4, 12, 2, True)
        names = [k for k, v in params.items() if v is not None]
        fn = lambda c, pa, *ws: ops.cls_cross_attention(  # noqa: E731
            c, pa, **dict(params, **dict(zip(names, ws))), **cfg, backend=backend)
        inputs = [cls, patches] + [params[k] for k in names]
    elif op == "cls_projection":
        fn = lambda x, a, b, w, c: ops.cls_projection(x, a, b, w, c, backend=backend)  # noqa: E731
        inputs = [torch.randn(3, 1, 8, **d), 1 + torch.randn(8, **d) / 5, torch.randn(8, **d) / 5,
                  torch.randn(6, 8, **d) / 3, torch.randn(6, **d)]
    elif op == "add_layer_norm":
        fn = lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, backend=backend)  # noqa: E731
        inputs = [torch.randn(2, 3, 10, **d), torch.randn(2, 3, 10, **d), 1 + torch.randn(10, **d) / 5,
                  torch.randn(10, **d) / 5]
    else:
        fn = lambda x, w, b: ops.layer_norm(x, w, b, backend=backend)  # noqa: E731
        inputs = [torch.randn(4, 10, **d), 1 + torch.randn(10, **d) / 5, torch.randn(10, **d) / 5]
    return fn, [t.detach().clone().requires_grad_() for t in inputs]


@pytest.mark.parametrize("op", ["cross_attention", "cls_projection", "add_layer_norm", "layer_norm"])
def test_gradcheck_torch_backend(op):
    fn, inputs = _op_and_inputs(op)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("second", ["autograd.grad", "backward"])
@pytest.mark.parametrize("first_loss", ["linear", "square"])
@pytest.mark.parametrize("op", ["cross_attention", "cls_projection", "add_layer_norm", "layer_norm"])
def test_double_backward_raises_instead_of_a_wrong_gradient(op, first_loss, second):
    """A second-order gradient through a fused op's backward raises, however it is asked for
    (before, ``autograd.grad(..., inputs=x)`` silently left the op's part out)."""
    fn, inputs = _op_and_inputs(op)
    x = inputs[0]
    y = fn(*inputs)
    y = y[0] if isinstance(y, tuple) else y
    first = y.sum() if first_loss == "linear" else y.square().sum()
    g, = torch.autograd.grad(first, x, create_graph=True)
    with pytest.raises(RuntimeError, match="is not differentiable.*naive_math"):
        if second == "backward":
            g.square().sum().backward()
        else:
            torch.autograd.grad(g.square().sum(), x)


def test_nested_torch_func_grad_raises():
    fn, inputs = _op_and_inputs("cross_attention")
    rest = inputs[1:]
    inner = torch.func.grad(lambda c: fn(c, *rest).square().sum())
    with pytest.raises(RuntimeError, match="is not differentiable"):
        torch.func.grad(lambda c: inner(c).square().sum())(inputs[0].detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_cls_gradient_is_rounded_once(dtype):
    """The CLS token's gradient from the token pass and from the query/residual paths is summed
    in fp32 and rounded to the activation dtype once: its error stays at that one rounding's
    (summing the parts in bf16 gave 1.7x of it)."""
    errors, floors = [], []
    for seed in range(8):
        torch.manual_seed(seed)
        cls, patches, params, cfg = cross_inputs(8, 16, 64, 4, True)
        ref_c, ref_p, ref_w = leaves(cls, patches, params)
        y_ref = reference.cls_cross_attention(ref_c, ref_p, **ref_w, **cfg)
        dy = torch.randn_like(y_ref).to(dtype).double()
        want, = torch.autograd.grad(y_ref, ref_c, dy)
        c, p, w = leaves(cls.to(dtype), patches.to(dtype), {k: v if v is None else v.float()
                                                            for k, v in params.items()})
        got, = torch.autograd.grad(ops.cls_cross_attention(c, p, **w, **cfg, backend="torch"), c,
                                   dy.to(dtype))
        errors.append(rel_err(got, want))
        floors.append(rel_err(want.to(dtype), want))
    assert sorted(errors)[4] < 1.25 * sorted(floors)[4], (errors, floors)


def test_cls_projection_matches_naive_float64():
    d = dict(dtype=torch.float64, device=DEVICE)
    tokens = torch.randn(3, 5, 24, **d)
    args = [1 + torch.randn(24, **d) / 5, torch.randn(24, **d) / 5, torch.randn(40, 24, **d) / 5,
            torch.randn(40, **d)]
    y = ops.cls_projection(tokens[:, 0:1], *args, backend="torch")
    assert y.shape == (3, 1, 40)
    assert rel_err(y, reference.cls_projection(tokens[:, 0:1], *args)) < 1e-12


def test_add_layer_norm_returns_sum_and_norm():
    x, r = torch.randn(2, 7, 20), torch.randn(2, 7, 20)
    w, b = torch.randn(20), torch.randn(20)
    y, h = ops.add_layer_norm(x, r, w, b, backend="torch")
    y_ref, h_ref = reference.add_layer_norm(x, r, w, b)
    assert torch.equal(h, h_ref) and rel_err(y, y_ref) < FP32_PAIR_TOL
    y2, h2 = ops.add_layer_norm(x, None, w, b)
    assert h2 is x and rel_err(y2, reference.add_layer_norm(x, None, w, b)[0]) < FP32_PAIR_TOL


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_add_layer_norm_of_bf16_branch_onto_fp32_stream(backend):
    # timm under autocast: x = x + attn(...) adds a bf16 output to the fp32 stream, then norm2.
    x = torch.randn(2, 9, 40, device=DEVICE).bfloat16().requires_grad_()
    r = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
    w, b = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    y, h = ops.add_layer_norm(x, r, w, b, backend=backend)
    y_ref, h_ref = reference.add_layer_norm(x.double(), r.double(), w.double(), b.double())
    assert y.dtype == h.dtype == torch.float32
    assert rel_err(h, h_ref) < 1e-6 and rel_err(y, y_ref) < 1e-5
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    dx, dr = torch.autograd.grad((y, h), (x, r), (dy, dh))
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    ref_dx, ref_dr = torch.autograd.grad(reference.add_layer_norm(x64, r64, w.double(), b.double()),
                                         (x64, r64), (dy.double(), dh.double()))
    assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32
    assert rel_err(dr, ref_dr) < 1e-5 and rel_err(dx, ref_dx) < 1e-2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_add_layer_norm_out_dtype_rounds_the_fp32_result(backend):
    # The blocks write norm1/norm2 in the autocast dtype for the Linear they feed: the very bits
    # that Linear's autocast cast of the fp32 result would give; gradients flow back to fp32.
    x = torch.randn(3, 11, 48, device=DEVICE, requires_grad=True)
    r = torch.randn(3, 11, 48, device=DEVICE, requires_grad=True)
    w, b = torch.randn(48, device=DEVICE), torch.randn(48, device=DEVICE)
    y16, h = ops.add_layer_norm(x, r, w, b, backend=backend, out_dtype=torch.bfloat16)
    y32, _ = ops.add_layer_norm(x, r, w, b, backend=backend)
    assert y16.dtype == torch.bfloat16 and h.dtype == torch.float32
    if backend == "triton" and DEVICE == "cpu":
        # Triton's interpreter truncates fp32 to bf16 (compiled Triton rounds to nearest even)
        assert (y16.float() - y32).abs().max() <= 2 ** -7 * y32.abs().max()
    else:
        assert torch.equal(y16, y32.bfloat16())
    dy = torch.randn_like(y16)
    got = torch.autograd.grad(y16, (x, r), dy)
    want = torch.autograd.grad(y32, (x, r), dy.float())
    for g, e in zip(got, want):
        assert g.dtype == torch.float32 and rel_err(g, e) < FP32_PAIR_TOL
    with pytest.raises(TypeError, match="out_dtype must be"):
        ops.add_layer_norm(x, r, w, b, out_dtype=torch.int32)


def test_ops_run_under_autocast_and_keep_activation_dtype():
    cls, patches, params, cfg = cross_inputs(2, 5, 24, 2, True, dtype=torch.float32)
    params = {k: (v.float() if v is not None else None) for k, v in params.items()}
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        y = ops.cls_cross_attention(cls, patches, **params, **cfg, backend="torch")
        z = ops.layer_norm(patches, params["norm_weight"], params["norm_bias"])
    assert y.dtype == torch.float32 and z.dtype == torch.float32
    # autocast must not leak into the op's own fp32 products (the Triton backend's token pass
    # may use the autocast dtype: test_triton_kernels.py)
    assert rel_err(y, ops.cls_cross_attention(cls, patches, **params, **cfg, backend="torch")) < FP32_PAIR_TOL


# ---- bad input -------------------------------------------------------------------------------

def test_cross_attention_rejects_bad_shapes_and_dtypes():
    cls, patches, params, cfg = cross_inputs(2, 5, 24, 2, True, dtype=torch.float32)
    params = {k: (v.float() if v is not None else None) for k, v in params.items()}
    with pytest.raises(ValueError, match="cls must be"):
        ops.cls_cross_attention(cls.expand(2, 3, 24), patches, **params, **cfg)
    with pytest.raises(ValueError, match=r"patches must be \[B, N, C\]"):
        ops.cls_cross_attention(cls, patches[..., :20], **params, **cfg)
    with pytest.raises(ValueError, match="patches must be"):
        ops.cls_cross_attention(cls, patches[:1], **params, **cfg)
    with pytest.raises(TypeError, match="patches dtype"):
        ops.cls_cross_attention(cls, patches.half(), **params, **cfg)
    with pytest.raises(TypeError, match="cls must be float32"):
        ops.cls_cross_attention(cls.int(), patches, **params, **cfg)
    for heads in (5, 0, 2.0, "2"):
        with pytest.raises(ValueError, match="num_heads must be a positive integer dividing C=24"):
            ops.cls_cross_attention(cls, patches, **params, num_heads=heads, scale=0.1)
    bad = dict(params, wk_weight=params["wk_weight"][:, :20])
    with pytest.raises(ValueError, match=r"wk_weight must be \[24, 24\]"):
        ops.cls_cross_attention(cls, patches, **bad, **cfg)
    bad = dict(params, proj_bias=params["proj_bias"][:3])
    with pytest.raises(ValueError, match=r"proj_bias must have shape \(24,\)"):
        ops.cls_cross_attention(cls, patches, **bad, **cfg)


def test_ops_take_any_integer_head_count():
    """A NumPy or 0-d tensor head count is the int it holds (timm's reshapes take them)."""
    cls, patches, params, cfg = cross_inputs(2, 5, 24, 2, True, dtype=torch.float32)
    params = {k: (v.float() if v is not None else None) for k, v in params.items()}
    expected = ops.cls_cross_attention(cls, patches, **params, **cfg)
    maps = ops.cls_attention_maps(cls, patches, *(params[k] for k in (
        "norm_weight", "norm_bias", "wq_weight", "wq_bias", "wk_weight")), **cfg)
    for heads in (np.int64(cfg["num_heads"]), torch.tensor(cfg["num_heads"])):
        config = dict(cfg, num_heads=heads)
        assert torch.equal(ops.cls_cross_attention(cls, patches, **params, **config), expected)
        assert torch.equal(ops.cls_attention_maps(cls, patches, *(params[k] for k in (
            "norm_weight", "norm_bias", "wq_weight", "wq_bias", "wk_weight")), **config), maps)


def test_ops_reject_a_device_mix():
    cls, patches, params, cfg = cross_inputs(2, 5, 24, 2, True, dtype=torch.float32)
    params = {k: (v.float() if v is not None else None) for k, v in params.items()}
    params["wv_weight"] = params["wv_weight"].to("meta")
    with pytest.raises(ValueError, match="one device.*wv_weight on meta"):
        ops.cls_cross_attention(cls, patches, **params, **cfg)
    with pytest.raises(ValueError, match="one device"):
        ops.layer_norm(torch.randn(3, 4), torch.ones(4, device="meta"), torch.zeros(4))


def test_layer_norm_and_projection_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(torch.randn(3, 8), torch.ones(7), torch.zeros(8))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.add_layer_norm(torch.randn(3, 8), torch.randn(2, 8), torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"x must be \[..., 8\]"):
        ops.cls_projection(torch.randn(3, 6), torch.ones(8), torch.zeros(8), torch.randn(4, 8), torch.zeros(4))
    with pytest.raises(TypeError, match="x must be float32"):
        ops.layer_norm(torch.ones(3, 8, dtype=torch.long), torch.ones(8), torch.zeros(8))


def test_biases_are_checked_like_weights():
    x, w, b = torch.randn(3, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(TypeError, match="bias must be a float tensor of shape"):
        ops.layer_norm(x, w, None)
    with pytest.raises(TypeError, match="ln_bias must be float32"):
        ops.cls_projection(x, w, b.long(), torch.randn(4, 8), torch.zeros(4))
    with pytest.raises(TypeError, match="bias must be a float tensor"):
        ops.cls_projection(x, w, b, torch.randn(4, 8), None)
    cls, patches, params, cfg = cross_inputs(2, 3, 8, 2, True, dtype=torch.float32, device="cpu")
    for name, bad in (("norm_bias", None), ("wq_bias", params["wq_bias"].long()),
                      ("proj_bias", params["proj_bias"].bool())):
        with pytest.raises(TypeError, match=name):
            ops.cls_cross_attention(cls, patches, **dict(params, **{name: bad}), **cfg)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_parameters_of_another_float_dtype_are_read_in_the_activations_precision(backend):
    """fp32 rows with float64 parameters, and float64 rows with fp32 parameters: the result is
    that of the parameters cast to the rows' accumulation dtype, forward and backward."""
    for act, par in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        cls, patches, params, cfg = cross_inputs(2, 5, 16, 2, True, dtype=act)
        mixed = {k: None if v is None else v.to(par) for k, v in params.items()}
        same = {k: None if v is None else v.to(act) for k, v in params.items()}
        outs = []
        for p in (mixed, same):
            c, pa, w = leaves(cls, patches, p)
            y = ops.cls_cross_attention(c, pa, **w, **cfg, backend=backend)
            z = ops.cls_projection(y.squeeze(1), w["norm_weight"], w["norm_bias"], w["wq_weight"],
                                   w["proj_bias"], backend=backend)
            dc, dp = torch.autograd.grad(z.square().sum(), [c, pa])
            outs.append((y, z, dc, dp))
        tol = 1e-5 if torch.float32 in (act, par) else 1e-12
        for got, want in zip(*outs):
            assert got.dtype == act
            assert rel_err(got, want) < tol


def test_custom_ops_fake_outputs_match_real_strides():
    """The compiler's fake implementations promise contiguous outputs, as the real ops return,
    whatever the inputs' layout (here column-major rows): opcheck compares the two."""
    d = dict(dtype=torch.float64, device="cpu")
    rows = torch.randn(8, 4, **d).t().requires_grad_()              # [4, 8], column-major
    res = torch.randn(4, 8, **d).requires_grad_()
    w, b = (1 + torch.randn(8, **d) / 5).requires_grad_(), torch.randn(8, **d).requires_grad_()
    for residual in (res, None):
        torch.library.opcheck(torch.ops.crossvit_fast.layer_norm.default,
                              (rows, residual, w, b, 1e-6, None, "torch"))
    torch.library.opcheck(torch.ops.crossvit_fast.cls_proj.default,
                          (rows, w, b, torch.randn(3, 8, **d).requires_grad_(),
                           torch.randn(3, **d).requires_grad_(), 1e-6, "torch"))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_token_pass_custom_op_passes_opcheck(backend):
    """The cross-attention's token pass, the one custom op of that block: fake outputs match the
    real ones (column-major CLS rows, kt as the transposed view the op passes), autograd
    registration, and its schema, on each backend."""
    d = dict(dtype=torch.float64, device=DEVICE)
    B, N, C, H = 4, 3, 8, 2
    x0 = torch.randn(C, B, **d).t().requires_grad_()                # [B, C], column-major
    patches = torch.randn(B, N, C, **d).requires_grad_()
    kt = torch.randn(H, B, C, **d).transpose(0, 1).requires_grad_()  # [B, H, C] view
    gamma = (1 + torch.randn(C, **d) / 5).requires_grad_()
    beta, wk_bias = (torch.randn(C, **d).requires_grad_() for _ in range(2))
    for bias in (wk_bias, None):
        torch.library.opcheck(torch.ops.crossvit_fast.attn_pool.default,
                              (x0, patches, kt, gamma, beta, bias, 1e-6, None, backend))


def test_unknown_and_unavailable_backends_say_why():
    x, w, b = torch.randn(3, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="unknown backend 'fast'.*auto, triton, cuda, torch"):
        ops.layer_norm(x, w, b, backend="fast")
    reason = backends.unavailable_reason("cuda", "cpu")
    assert reason  # the CUDA extension never runs on CPU tensors
    with pytest.raises(BackendUnavailableError, match="cannot run on cpu"):
        ops.layer_norm(x, w, b, backend="cuda")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_add_layer_norm_gives_two_leaves_gradients_of_their_own(backend):
    """x and residual get the same gradient; as leaves each keeps its own copy as ``.grad``, so
    gradients accumulate over backward passes as ``LayerNorm(x + residual)``'s do (they shared
    memory, and the second pass added each into both)."""
    d = dict(dtype=torch.float32, device=DEVICE)
    x, r = torch.randn(2, 3, 8, **d, requires_grad=True), torch.randn(2, 3, 8, **d, requires_grad=True)
    w, b, g = 1 + torch.randn(8, **d) / 5, torch.randn(8, **d) / 5, torch.randn(2, 3, 8, **d)
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, r))
    for _ in range(2):
        (ops.add_layer_norm(x, r, w, b, backend=backend)[0] * g).sum().backward()
        (torch.nn.functional.layer_norm(x64 + r64, (8,), w.double(), b.double(), 1e-6)
         * g.double()).sum().backward()
    assert x.grad.data_ptr() != r.grad.data_ptr()
    assert rel_err(x.grad, x64.grad) <= FP32_REL_TOL and rel_err(r.grad, r64.grad) <= FP32_REL_TOL


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                              (torch.float64, torch.bfloat16), (torch.float16, torch.float64)],
                         ids=["fp32_to_fp64", "fp64_to_fp32", "fp64_to_bf16", "fp16_to_fp64"])
def test_layer_norm_backward_with_the_output_in_another_precision(backend, dtype, out_dtype):
    """``out_dtype`` of another accumulation dtype than the rows' (the gradient then arrives in
    it): the backward computes in the rows' accumulation dtype (it raised on the PyTorch
    backend)."""
    d = dict(device=DEVICE)
    x = torch.randn(4, 8, dtype=dtype, **d).requires_grad_()
    w, b = (1 + torch.randn(8, **d) / 5).requires_grad_(), (torch.randn(8, **d) / 5).requires_grad_()
    y, _ = ops.add_layer_norm(x, None, w, b, backend=backend, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    g = torch.randn(4, 8, dtype=out_dtype, **d)
    grads = torch.autograd.grad((y * g).sum(), [x, w, b])
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad((torch.nn.functional.layer_norm(x64, (8,), w64, b64, 1e-6)
                                * g.double()).sum(), [x64, w64, b64])
    bar = tolerance(torch.bfloat16 if torch.bfloat16 in (dtype, out_dtype) else
                    torch.float16 if dtype == torch.float16 else torch.float32)
    for got, expected, t in zip(grads, want, (x, w, b)):
        assert got.dtype == t.dtype
        assert rel_err(got, expected) <= bar


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_with_a_strided_last_dim(backend):
    """LayerNorm and the CLS projection on column-major fp32 rows (a transposed view) give what
    they give on the same rows made contiguous (the CUDA backend's kernels read unit-stride
    rows; it copies such rows first)."""
    d = dict(dtype=torch.float32, device=DEVICE)
    rows = torch.randn(8, 5, **d).t()                                  # [5, 8], column-major
    w, b = 1 + torch.randn(8, **d) / 5, torch.randn(8, **d) / 5
    weight, bias = torch.randn(3, 8, **d) / 3, torch.randn(3, **d)
    assert rel_err(ops.layer_norm(rows, w, b, backend=backend),
                   ops.layer_norm(rows.contiguous(), w, b, backend=backend)) <= FP32_PAIR_TOL
    assert rel_err(ops.cls_projection(rows, w, b, weight, bias, backend=backend),
                   ops.cls_projection(rows.contiguous(), w, b, weight, bias, backend=backend)) <= FP32_PAIR_TOL


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", ["cross_attention", "cls_projection", "add_layer_norm", "layer_norm"])
def test_ops_under_torch_func_compute_on_the_pytorch_backend(backend, op):
    """``torch.func.grad`` and a no-grad ``vmap`` of an op on any backend: the kernels cannot
    read the transforms' wrapped tensors, so the PyTorch backend's ATen ops run, and the results
    are its autograd's and its forward's."""
    fn, inputs = _op_and_inputs(op, backend)
    on_torch, _ = _op_and_inputs(op)

    def first(out):
        return out[0] if isinstance(out, tuple) else out
    x, rest = inputs[0], [t.detach() for t in inputs[1:]]
    expected, = torch.autograd.grad(first(on_torch(x, *rest)).square().sum(), x)
    got = torch.func.grad(lambda x: first(fn(x, *rest)).square().sum())(x.detach())
    assert rel_err(got, expected) <= 1e-12
    if op in ("cls_projection", "layer_norm"):     # x alone batched: one row (group) a sample
        with torch.no_grad():
            mapped = first(torch.func.vmap(lambda xi: fn(xi, *rest))(x))
            assert rel_err(mapped, first(on_torch(x, *rest))) <= 1e-12


def test_cls_projection_of_an_empty_width_says_so():
    with pytest.raises(ValueError, match="weight must have a non-empty input width"):
        ops.cls_projection(torch.randn(2, 0), torch.ones(0), torch.zeros(0), torch.randn(3, 0),
                           torch.zeros(3))
