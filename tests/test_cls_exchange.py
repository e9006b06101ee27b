"""The fused CLS exchange (crossvit_fast.kernels.cls_exchange, run by crossvit_fast.fused_exchange
where ``layers.FUSED_CLS_EXCHANGE`` is set): one kernel per direction against timm's math in
float64 (K and V formed, wk's bias included), and the model's logits with it against the model's
without it and against timm; it runs only where it computes what timm's modules would.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from crossvit_fast import (GraphedInference, branch_streams, fused_exchange, layers, reference,
                           use_backend)
from crossvit_fast.kernels import cls_exchange as ex

from .conftest import DEVICE, backend_param
from .numerics import FP32_PAIR_TOL, FP32_REL_TOL, rel_err, tolerance, torch_lowp_error
from .test_model import small_model

pytestmark = pytest.mark.parametrize("backend", [backend_param("triton")])
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _weights(Ci: int, Cj: int, heads: int, biases: bool):
    """float64 parameters of one direction (LayerNorm affines away from 1 and 0, each LayerNorm
    its own eps, Linears scaled to keep activations O(1)); wk's bias, which the kernel never
    reads, is the last."""
    def r(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64) * scale

    def projection(c_in, c_out, eps):
        return ex.Projection(1 + r(c_in, scale=.2), r(c_in, scale=.2), eps,
                             r(c_out, c_in, scale=c_in ** -.5), r(c_out, scale=.2))
    proj = projection(Ci, Cj, 1e-6)
    attn = ex.CrossAttention(
        1 + r(Cj, scale=.2), r(Cj, scale=.2), 1e-5, r(Cj, Cj, scale=Cj ** -.5),
        r(Cj, scale=.2) if biases else None, r(Cj, Cj, scale=Cj ** -.5), r(Cj, Cj, scale=Cj ** -.5),
        r(Cj, scale=.2) if biases else None, r(Cj, Cj, scale=Cj ** -.5),
        r(Cj, scale=.2) if biases else None, heads, (Cj // heads) ** -0.5)
    return proj, attn, projection(Cj, Ci, 1e-3), r(Cj, scale=.5)


def _cast(weights, dtype):
    return type(weights)(*[t.to(dtype) if isinstance(t, torch.Tensor) else t for t in weights])


def naive_exchange(cls, patches, proj, attn, revert, wk_bias, rounded=None):
    """timm's three modules on ``[B, Ci]`` CLS rows: projection, CrossAttentionBlock (K and V of
    every token formed; its residual added to the CLS row of ``[x0 ‖ patches]``, promoted as
    timm's concatenation promotes it), projection back; in the inputs' dtype. ``rounded``: a
    dtype the outputs of the projections' and the out-projection's Linears are rounded to (where
    autocast's Linears write it), and nothing else."""
    def linear(x, weight, bias):
        y = F.linear(x, weight, bias)
        return y if rounded is None else y.to(rounded).to(y.dtype)

    def project(x, p):
        return linear(F.gelu(F.layer_norm(x, x.shape[-1:], p.ln_weight, p.ln_bias, p.eps)),
                      p.weight, p.bias)
    x0 = project(cls, proj)
    tokens = torch.cat((x0[:, None], patches), dim=1)
    B, T, C = tokens.shape
    H = attn.num_heads
    n = F.layer_norm(tokens, (C,), attn.ln_weight, attn.ln_bias, attn.eps)
    q = F.linear(n[:, :1], attn.wq_weight, attn.wq_bias).view(B, 1, H, C // H).transpose(1, 2)
    k = F.linear(n, attn.wk_weight, wk_bias).view(B, T, H, C // H).transpose(1, 2)
    v = F.linear(n, attn.wv_weight, attn.wv_bias).view(B, T, H, C // H).transpose(1, 2)
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    y = tokens[:, 0] + linear((a @ v).transpose(1, 2).reshape(B, C), attn.proj_weight,
                              attn.proj_bias)
    return project(y, revert)


# (B, Ci, Cj, heads, N, biases): odd token counts, one token, none (the CLS token attends to
# itself alone), heads of 16 and of 20 channels, widths that are no power of two,
# crossvit_tiny_240's and crossvit_18_240's directions
SHAPES = [(2, 96, 192, 3, 37, True), (1, 48, 80, 5, 1, False), (3, 40, 60, 3, 50, True),
          (1, 448, 224, 7, 19, True), (2, 24, 48, 2, 70, True), (2, 32, 16, 1, 0, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_{}to{}_H{}_N{}".format(*s[:5]))
def test_kernel_matches_timms_math_in_float64(backend, shape, dtype):
    B, Ci, Cj, H, N, biases = shape
    proj, attn, revert, wk_bias = _weights(Ci, Cj, H, biases)
    own = torch.randn(B, 5, Ci, dtype=torch.float64)
    # a mean off zero; rows wider than the branch (a strided view: the row stride is not Cj)
    other = (torch.randn(B, N + 1, Cj + 8, dtype=torch.float64) * 2 + 1)[..., :Cj]
    args64 = (own[:, 0], other[:, 1:], proj, attn, revert, wk_bias)
    expected = naive_exchange(*args64)

    own_d, other_d = own.to(DEVICE, dtype), other.to(DEVICE, dtype)
    weights = [_cast(w, dtype) for w in (proj, attn, revert)]
    weights = [type(w)(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w]) for w in weights]
    out = torch.empty(B, Ci, device=DEVICE, dtype=dtype)
    # the CLS rows and the patches are strided views of the branches' tokens, read in place
    ex.cls_exchange(own_d[:, 0], other_d[:, 1:], out, *weights)

    if dtype in (torch.float32, torch.float64):
        bar = FP32_REL_TOL if dtype == torch.float32 else 1e-12
    else:
        def naive_in(cls, patches, *w):
            return naive_exchange(cls, patches, *[_cast(x, cls.dtype) if isinstance(x, tuple) else
                                                  x.to(cls.dtype) for x in w])
        bar = tolerance(dtype, [torch_lowp_error(naive_in, args64, dtype)])
    assert out.dtype == dtype
    err = rel_err(out.cpu(), expected)
    assert err <= bar, f"relative error {err:.2e} > {bar:.1e}"


@pytest.mark.parametrize("linear_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "B{}_{}to{}_H{}_N{}".format(*s[:5]))
def test_kernel_for_autocast_matches_timms_math_in_float64(backend, shape, linear_dtype):
    """fp32 tokens and parameters, the Linears' outputs rounded to autocast's dtype: as close
    to timm's math in float64 as timm's modules under autocast are, and the new CLS rows are
    values of that dtype (the projection back's output, rounded)."""
    B, Ci, Cj, H, N, biases = shape
    proj, attn, revert, wk_bias = _weights(Ci, Cj, H, biases)
    own = torch.randn(B, 5, Ci, dtype=torch.float64)
    other = torch.randn(B, N + 1, Cj, dtype=torch.float64) * 2 + 1
    expected = naive_exchange(own[:, 0], other[:, 1:], proj, attn, revert, wk_bias)

    def to32(w):
        return type(w)(*[t.to(DEVICE, torch.float32) if isinstance(t, torch.Tensor) else t for t in w])
    own32, other32 = own.to(DEVICE, torch.float32), other.to(DEVICE, torch.float32)
    with torch.autocast(DEVICE, dtype=linear_dtype):
        timms = naive_exchange(own32[:, 0], other32[:, 1:], to32(proj), to32(attn), to32(revert),
                               wk_bias.to(DEVICE, torch.float32))
    out = torch.empty(B, Ci, device=DEVICE)
    ex.cls_exchange(own32[:, 0], other32[:, 1:], out, to32(proj), to32(attn), to32(revert),
                    linear_dtype)

    assert out.dtype == torch.float32
    assert torch.equal(out, out.to(linear_dtype).float())
    bar = tolerance(linear_dtype, [rel_err(timms.cpu(), expected)])
    err = rel_err(out.cpu(), expected)
    assert err <= bar, f"relative error {err:.2e} > {bar:.1e}"


# On the CPU fp16 only: Triton's interpreter truncates fp32 to bf16 where a GPU rounds to nearest.
@pytest.mark.parametrize("linear_dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "B{}_{}to{}_H{}_N{}".format(*s[:5]))
def test_kernel_rounds_where_timms_linears_write_under_autocast(backend, shape, linear_dtype):
    """The rounding points alone, without fp32's noise: on float64 tokens and parameters, with
    the Linears' outputs rounded to ``linear_dtype``, the kernel gives timm's math in float64
    rounded there and nowhere else (the block's residual sum stays in the tokens' dtype)."""
    B, Ci, Cj, H, N, biases = shape
    proj, attn, revert, wk_bias = _weights(Ci, Cj, H, biases)
    own = torch.randn(B, 5, Ci, dtype=torch.float64)
    other = torch.randn(B, N + 1, Cj, dtype=torch.float64) * 2 + 1
    expected = naive_exchange(own[:, 0], other[:, 1:], proj, attn, revert, wk_bias,
                              rounded=linear_dtype)
    weights = [type(w)(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w])
               for w in (proj, attn, revert)]
    own_d, other_d = own.to(DEVICE), other.to(DEVICE)
    out = torch.empty(B, Ci, device=DEVICE, dtype=torch.float64)
    ex.cls_exchange(own_d[:, 0], other_d[:, 1:], out, *weights, linear_dtype)
    err = rel_err(out.cpu(), expected)
    assert err <= 1e-9, f"relative error {err:.2e}"


def test_kernel_writes_over_the_cls_row_it_reads(backend):
    """The model writes the new CLS row over the old one in place: the kernel reads the row
    before it writes it."""
    proj, attn, revert, _ = [w if not isinstance(w, tuple) else type(w)(*[
        t.float().to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w])
        for w in _weights(24, 48, 2, True)]
    own = torch.randn(2, 4, 24, device=DEVICE)
    other = torch.randn(2, 9, 48, device=DEVICE)
    apart = ex.cls_exchange(own[:, 0], other[:, 1:], torch.empty(2, 24, device=DEVICE), proj, attn, revert)
    rest = own[:, 1:].clone()
    ex.cls_exchange(own[:, 0], other[:, 1:], own[:, 0], proj, attn, revert)
    assert torch.equal(own[:, 0], apart) and torch.equal(own[:, 1:], rest)


def _count_kernel_calls(monkeypatch) -> list:
    calls = []
    kernel = ex.cls_exchange
    monkeypatch.setattr(ex, "cls_exchange", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    return calls


@pytest.fixture
def fused_exchange_on(monkeypatch):
    monkeypatch.setattr(layers, "FUSED_CLS_EXCHANGE", True)


def test_model_logits_with_the_fused_exchange(backend, monkeypatch, fused_exchange_on):
    model = small_model().to(DEVICE).eval()
    x = torch.randn(3, 3, 48, 48, device=DEVICE)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad(), use_backend("triton"):
        fused = model(x)
        assert len(calls) == 6          # 3 multi-scale blocks, 2 directions
        monkeypatch.setattr(layers, "FUSED_CLS_EXCHANGE", False)
        unfused = model(x)
    assert len(calls) == 6
    assert rel_err(fused, unfused) <= FP32_PAIR_TOL


def test_model_with_the_fused_exchange_gives_timms_logits(backend, monkeypatch, fused_exchange_on):
    from .timm_import import import_timm
    timm = import_timm()
    import crossvit_fast
    reference = timm.create_model("crossvit_tiny_240").eval()
    model = crossvit_fast.create_model("crossvit_tiny_240").eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 240, 240)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        expected = reference.double()(x.double())
        with use_backend("triton"):
            got = model.to(DEVICE)(x.to(DEVICE))
    assert len(calls) == 6
    assert rel_err(got.cpu(), expected) <= FP32_REL_TOL
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        timms = reference.float()(x)
        with use_backend("triton"), torch.autocast(DEVICE, dtype=torch.bfloat16):
            got = model(x.to(DEVICE))
    assert len(calls) == 12
    assert rel_err(got.cpu(), expected) <= tolerance(torch.bfloat16, [rel_err(timms, expected)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_under_autocast_with_the_fused_exchange(backend, dtype, monkeypatch, fused_exchange_on):
    """An fp32 model under autocast runs the kernels, and its logits are as close to the model's
    in fp32 as they are without the kernels."""
    model = small_model().to(DEVICE).eval()
    x = torch.randn(3, 3, 48, 48, device=DEVICE)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad(), use_backend("triton"):
        expected = model(x)
        assert len(calls) == 6
        with torch.autocast(DEVICE, dtype=dtype):
            fused = model(x)
            assert len(calls) == 12
            monkeypatch.setattr(layers, "FUSED_CLS_EXCHANGE", False)
            unfused = model(x)
    assert len(calls) == 12
    assert rel_err(fused, expected) <= tolerance(dtype, [rel_err(unfused, expected)])


def test_the_linears_dtype_under_autocast(backend):
    """The kernel rounds the Linears' outputs as timm's do: autocast's dtype on fp32 tokens or
    tokens already in it; no kernel on 16-bit tokens of another dtype (timm's exchange would
    promote them to fp32)."""
    def on(dtype):
        return torch.empty(1, 2, 8, dtype=dtype)
    assert fused_exchange._linear_dtype(on(torch.float32)) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_exchange._linear_dtype(on(torch.float32)) == torch.bfloat16
        assert fused_exchange._linear_dtype(on(torch.bfloat16)) == torch.bfloat16
        assert fused_exchange._linear_dtype(on(torch.float16)) is None


def test_a_hooked_branch_output_is_not_written_over(backend, monkeypatch, fused_exchange_on):
    """A hook on a branch's last block holds the tokens the exchange would write its CLS row
    into: the kernel then writes a new tensor."""
    model = small_model().to(DEVICE).eval()
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    held = []
    model.blocks[0].blocks[1][-1].register_forward_hook(lambda m, i, o: held.append((o, o.clone())))
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad(), use_backend("triton"):
        fused = model(x)
        monkeypatch.setattr(layers, "FUSED_CLS_EXCHANGE", False)
        unfused = model(x)
    assert len(calls) == 6
    tokens, copy = held[0]
    assert torch.equal(tokens, copy)
    assert rel_err(fused, unfused) <= FP32_PAIR_TOL


@contextlib.contextmanager
def _hooked(module):
    handle = module.register_forward_hook(lambda m, i, o: None)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _set(owner, name, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


# Each makes the fused exchange not apply (the forward then runs timm's modules); a hook, only in
# the multi-scale block it is in.
NOT_FUSED = {
    "gradients": lambda model: torch.enable_grad(),
    "torch backend": lambda model: use_backend("torch"),
    "hooked projection": lambda model: _hooked(model.blocks[1].projs[0][2]),
    "hooked revert projection": lambda model: _hooked(model.blocks[1].revert_projs[1]),
    "hooked cross-attention": lambda model: _hooked(model.blocks[2].fusion[0].attn.wv),
    "hooked proj_drop": lambda model: _hooked(model.blocks[0].fusion[1].attn.proj_drop),
    "hooked drop_path": lambda model: _hooked(model.blocks[1].fusion[0].drop_path),
    "naive math": lambda model: reference.naive_math(),
    "attention maps recorded": lambda model: layers.recording_attention_maps(),
    "batch over the limit": lambda model: _set(layers, "FUSED_CLS_EXCHANGE_MAX_BATCH", 1),
    "width over the limit": lambda model: _set(ex, "MAX_WIDTH", 32),
    "switched off": lambda model: _set(layers, "FUSED_CLS_EXCHANGE", False),
}


@pytest.mark.parametrize("condition", list(NOT_FUSED))
def test_the_fused_exchange_runs_only_where_it_computes_timms_result(backend, condition, monkeypatch,
                                                                       fused_exchange_on):
    model = small_model().to(DEVICE).eval()
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad(), use_backend("triton"):
        expected = model(x)             # fused
        assert len(calls) == 6
        with NOT_FUSED[condition](model):
            got = model(x)
    assert len(calls) == 6 + (4 if condition.startswith("hooked") else 0), condition
    assert rel_err(got, expected) <= FP32_PAIR_TOL


def test_not_in_training_mode_with_dropout_or_stochastic_depth(backend, monkeypatch, fused_exchange_on):
    """Under no_grad but in training mode, dropout and stochastic depth act: timm's modules run."""
    calls = _count_kernel_calls(monkeypatch)
    for rates in (dict(proj_drop_rate=0.1), dict(attn_drop_rate=0.1), dict(drop_path_rate=0.1)):
        model = small_model(**rates).to(DEVICE).train()
        with torch.no_grad(), use_backend("triton"):
            model(torch.randn(2, 3, 48, 48, device=DEVICE))
            assert not calls, rates
            model.eval()(torch.randn(2, 3, 48, 48, device=DEVICE))
            assert len(calls) == 6, rates
        calls.clear()


@gpu
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.float16, None), (torch.float32, torch.bfloat16)],
                         ids=["fp32", "bf16", "fp16", "fp32_bf16_autocast"])
def test_graphed_and_two_stream_inference_with_the_fused_exchange(backend, dtype, autocast,
                                                                 monkeypatch, fused_exchange_on):
    """On the GPU: the model with the kernels gives its logits without them, eagerly, with the
    branches on two streams (each direction's kernel on its own stream, writing in place), and
    captured and replayed in a CUDA graph."""
    model = small_model().cuda().to(dtype).eval()
    x = torch.randn(2, 3, 48, 48, device="cuda", dtype=dtype)
    calls = _count_kernel_calls(monkeypatch)
    tol = FP32_PAIR_TOL if dtype == torch.float32 and autocast is None else 2e-2
    with torch.no_grad(), torch.autocast("cuda", dtype=autocast or torch.bfloat16,
                                         enabled=autocast is not None):
        fused = model(x)
        assert len(calls) == 6
        with branch_streams.concurrent_branches():
            concurrent = model(x)
        assert len(calls) == 12
        graphed = GraphedInference(model)
        graphed(x)
        replay = graphed(x)
        with branch_streams.concurrent_branches():
            graphed(x)
            concurrent_replay = graphed(x)
        monkeypatch.setattr(layers, "FUSED_CLS_EXCHANGE", False)
        unfused = model(x)
    for name, got in (("eager", fused), ("two streams", concurrent), ("replay", replay),
                      ("two-stream replay", concurrent_replay)):
        assert rel_err(got, unfused) <= tol, name
