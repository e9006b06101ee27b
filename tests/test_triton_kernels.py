"""Triton-specific checks beyond the shared primitive tests (tests/test_primitives.py).

* the kernels really launch for every primitive, forward and backward (no silent torch fallback);
* the flash-decoding split of the token axis, forced on and off, and chosen by the plan;
* the channel tiling's edges (widths not a multiple of the tile, one patch token, tokens not a
  multiple of the split, heads not a power of two, rows with a large mean);
* CrossViT-18 widths (224, 448) with 7 heads, 1 and 16 heads, float64, and odd strides.

Under ``TRITON_INTERPRET=1`` (set by conftest.py on CPU machines) the kernels run in Triton's
interpreter, so shapes stay small.
"""
import contextlib
from unittest import mock

import pytest
import torch

from crossvit_fast import backends, ops
from crossvit_fast.backends import use_backend as crossvit_fast_backend
from crossvit_fast.backends import torch_backend as ref

from .conftest import DEVICE
from .numerics import assert_rel_close, rel_err, tolerance, torch_lowp_error
from .test_primitives import EPS, f64, naive_attn_pool, naive_cls_proj, pool_inputs


@pytest.fixture(autouse=True)
def gpu_plan(monkeypatch):
    """The token pass planned as on a GPU (channel tiles, token groups, splits), not as the
    interpreter's whole-row plan: the tiling is what these tests check."""
    try:
        from crossvit_fast.kernels import attn_pool
    except ImportError:     # no Triton: nothing to plan
        return
    monkeypatch.setattr(attn_pool, "GPU_PLAN_ON_CPU", True)


pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                                reason=str(backends.unavailable_reason("triton", DEVICE)))

if backends.unavailable_reason("triton", DEVICE) is None:
    from crossvit_fast.backends import triton_backend as tb
    from crossvit_fast.kernels import _launch, attn_pool, cls_proj, layer_norm

    KERNELS = {
        "scores": (attn_pool, "_scores_kernel"),
        "pool_fwd": (attn_pool, "_pool_fwd_kernel"),
        "pool_combine": (attn_pool, "_pool_combine_kernel"),
        "token_bwd": (attn_pool, "_token_bwd_kernel"),
        "pool_bwd": (attn_pool, "_pool_bwd_kernel"),
        "layer_norm_fwd": (layer_norm, "_layer_norm_fwd_kernel"),
        "layer_norm_bwd": (layer_norm, "_layer_norm_bwd_kernel"),
        "cls_proj_fwd": (cls_proj, "_cls_proj_fwd_kernel"),
        "cls_proj_bwd": (cls_proj, "_cls_proj_bwd_kernel"),
    }
    # The kernels each primitive launches (without a token split: no combine).
    PRIMITIVE_KERNELS = {
        "attn_pool_fwd": {"scores", "pool_fwd"}, "attn_pool_bwd": {"token_bwd", "pool_bwd"},
        "layer_norm_fwd": {"layer_norm_fwd"}, "layer_norm_bwd": {"layer_norm_bwd"},
        "cls_proj_fwd": {"cls_proj_fwd"}, "cls_proj_bwd": {"cls_proj_bwd"},
    }


class _Spy:
    """Stands in for a ``@triton.jit`` kernel: records the grid of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.grids.append(tuple(grid))
            return launch(*args, **kwargs)
        return run


@contextlib.contextmanager
def spied(*names):
    """Replace the named kernels (keys of KERNELS) by spies; yields ``{name: spy}``."""
    spies = {name: _Spy(getattr(*KERNELS[name])) for name in names}
    with contextlib.ExitStack() as stack:
        for name, spy in spies.items():
            stack.enter_context(mock.patch.object(KERNELS[name][0], KERNELS[name][1], spy))
        yield spies


def check_attn_pool(fwd, bwd, shape, dtype, **kwargs):
    """``fwd``/``bwd`` (with ``kwargs``) against the float64 reference, at test_primitives' bars."""
    x0, patches, kt, gamma, beta = pool_inputs(*shape, dtype)
    ref_in = f64(x0, patches, kt, gamma, beta)
    z_ref, lse_ref = ref.attn_pool_fwd(*ref_in, EPS)
    lowp = dtype not in (torch.float32, torch.float64)
    tol = tolerance(dtype, [torch_lowp_error(naive_attn_pool, ref_in, dtype)] if lowp else [])
    z, lse = fwd(x0, patches, kt.float(), gamma.float(), beta.float(), EPS, **kwargs)
    assert_rel_close(z, z_ref, tol, "z")
    assert_rel_close(lse, lse_ref, tol, "lse")
    dz = torch.randn_like(z_ref)
    expected = ref.attn_pool_bwd(dz, *ref_in, z_ref, lse_ref, EPS)
    if lowp:
        naive_grads = lambda *a: torch.autograd.grad(  # noqa: E731
            naive_attn_pool(*a)[0], a, dz.to(a[0].dtype))
        tol = tolerance(dtype, [torch_lowp_error(naive_grads, [t.requires_grad_() for t in ref_in], dtype)])
    grads = bwd(dz.float(), x0, patches, kt.float(), gamma.float(), beta.float(), z, lse, EPS, **kwargs)
    for name, g, e in zip(("dx0", "dpatches", "dkt", "dgamma", "dbeta"), grads, expected):
        if name == "dkt" and shape[1] == 0:   # exactly 0, left as rounding: as in test_primitives
            cancelling = (dz.norm(dim=-1).max() * z_ref.norm(dim=-1).max()).item()
            assert g.abs().max().item() <= tol * cancelling, "dkt with N=0"
            continue
        assert_rel_close(g, e, tol, name)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype


@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centred", "mean_50"])
def test_fp32_tokens_with_fp16_dots(offset):
    # Under autocast the op lets fp32 tokens use fp16/bf16 dots (bf16 dots only run on a GPU:
    # design.md §4). The scores then come from the normalized tokens, so a large common offset
    # of the tokens (which rounding the raw tokens to fp16 would turn into score error) costs
    # nothing; the error stays that of fp16 products, above fp32's (the path was taken).
    B, N, C, H = 2, 45, 40, 3
    x0, patches, kt, gamma, beta = pool_inputs(B, N, C, H, torch.float64)
    x0, patches = x0 + offset, patches + offset
    ref_in = f64(x0, patches, kt, gamma, beta)
    z_ref, lse_ref = ref.attn_pool_fwd(*ref_in, EPS)
    tol = tolerance(torch.float16, [torch_lowp_error(naive_attn_pool, [t - offset if i < 2 else t for i, t in
                                                                       enumerate(ref_in)], torch.float16)])
    args = (x0.float(), patches.float(), kt.float(), gamma.float(), beta.float(), EPS)
    z, lse = attn_pool.attn_pool_fwd(*args, dot_dtype=torch.float16)
    assert z.dtype == torch.float32
    assert_rel_close(z, z_ref, tol, "z")
    assert_rel_close(lse, lse_ref, tol, "lse")
    assert rel_err(z, z_ref) > 1e-6, "fp16 products were expected"
    dz = torch.randn_like(z_ref)
    expected = ref.attn_pool_bwd(dz, *ref_in, z_ref, lse_ref, EPS)
    grads = attn_pool.attn_pool_bwd(dz.float(), *args[:5], z, lse, EPS, dot_dtype=torch.float16)
    for name, g, e in zip(("dx0", "dpatches", "dkt", "dgamma", "dbeta"), grads, expected):
        assert_rel_close(g, e, 4 * tol, name)


def test_op_under_autocast_gives_the_token_pass_the_autocast_dtype(monkeypatch):
    seen = []
    real = tb.attn_pool_fwd
    monkeypatch.setattr(tb, "attn_pool_fwd", lambda *a: seen.append(a[-1]) or real(*a))
    B, N, C, H = 2, 5, 24, 2
    tokens, cls = torch.randn(B, N + 1, C, device=DEVICE), torch.randn(B, 1, C, device=DEVICE)
    nw, nb = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    w = [torch.randn(C, C, device=DEVICE) / C ** 0.5 for _ in range(4)]
    call = lambda: ops.cls_cross_attention(cls, tokens[:, 1:], nw, nb, w[0], None, w[1], None,  # noqa: E731
                                           w[2], None, w[3], None, H, (C // H) ** -0.5, backend="triton")
    y = call()
    with torch.autocast(device_type=DEVICE, dtype=torch.float16):
        y16 = call()
    assert seen == [None, torch.float16]
    assert y16.dtype == torch.float32 and 1e-7 < rel_err(y16, y) < 1e-2


# --- the kernels run -----------------------------------------------------------------------------

def _primitive_calls(dtype):
    """``{primitive name: thunk}`` calling each triton_backend primitive once on small inputs."""
    x0, patches, kt, gamma, beta = pool_inputs(2, 9, 40, 3, dtype)
    kt, gamma, beta = kt.float(), gamma.float(), beta.float()
    z, lse = ref.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS)
    rows = torch.randn(4, 40, device=DEVICE).to(dtype)
    w, b = 1 + 0.3 * torch.randn(40, device=DEVICE), 0.3 * torch.randn(40, device=DEVICE)
    _, h, mean, rstd = ref.layer_norm_fwd(rows, rows, w, b, EPS)
    pw, pb = torch.randn(24, 40, device=DEVICE) / 40 ** 0.5, torch.randn(24, device=DEVICE)
    _, pmean, prstd = ref.cls_proj_fwd(rows, w, b, pw, pb, EPS)
    return {
        "attn_pool_fwd": lambda: tb.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS),
        "attn_pool_bwd": lambda: tb.attn_pool_bwd(torch.randn_like(z), x0, patches, kt, gamma, beta,
                                                  z, lse, EPS),
        "layer_norm_fwd": lambda: tb.layer_norm_fwd(rows, rows, w, b, EPS),
        "layer_norm_bwd": lambda: tb.layer_norm_bwd(rows, rows, h, w, mean, rstd),
        "cls_proj_fwd": lambda: tb.cls_proj_fwd(rows, w, b, pw, pb, EPS),
        "cls_proj_bwd": lambda: tb.cls_proj_bwd(torch.randn(4, 24, device=DEVICE).to(dtype), rows,
                                                w, b, pw, pmean, prstd),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_primitive_launches_its_kernel(dtype):
    assert backends.resolve("triton", DEVICE) == "triton"
    assert backends.implementation("triton") is tb
    for name, call in _primitive_calls(dtype).items():
        with spied(*KERNELS) as spies:
            call()
        launched = {k for k, s in spies.items() if s.grids}
        assert launched == PRIMITIVE_KERNELS[name], f"{name} launched {sorted(launched)}"


def test_split_forward_launches_the_combine_kernel():
    x0, patches, kt, gamma, beta = pool_inputs(1, 200, 24, 3, torch.float32)
    with spied("pool_fwd", "pool_combine") as spies:
        tb.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS)     # B = 1: the plan splits
    (_, tiles, splits), = spies["pool_fwd"].grids
    assert splits > 1 and spies["pool_combine"].grids == [(3, tiles)]


def test_ops_route_through_the_kernels():
    """Forward and backward of each custom op with backend='triton' launch the kernels."""
    B, N, C, H = 2, 5, 24, 2
    tokens = torch.randn(B, N + 1, C, device=DEVICE, requires_grad=True)
    cls = torch.randn(B, 1, C, device=DEVICE, requires_grad=True)
    nw, nb = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    wq, wk, wv, wp = (torch.randn(C, C, device=DEVICE) / C ** 0.5 for _ in range(4))
    with spied(*(k for k in KERNELS if k != "pool_combine")) as spies:  # too few tokens to split
        y = ops.cls_cross_attention(cls, tokens[:, 1:], nw, nb, wq, None, wk, None, wv, None, wp,
                                    None, H, (C // H) ** -0.5, backend="triton")
        y, _ = ops.add_layer_norm(y, cls, nw, nb, backend="triton")
        y = ops.cls_projection(y, nw, nb, wq, nw, backend="triton")
        y.sum().backward()
    assert all(s.grids for s in spies.values()), {k: s.grids for k, s in spies.items()}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_the_models_cross_attention_launches_the_kernels_with_and_without_grad(grad):
    """The model on the Triton backend runs the token pass as the Triton kernels, in inference
    (no grad: the ops' eager path) as in training: a fallback to the PyTorch math would give the
    same numbers, so only the launches tell."""
    from .test_model import small_model
    model = small_model().eval()
    x = torch.randn(2, 3, *model.img_size, device=DEVICE)
    fusions = sum(len(block.fusion) for block in model.blocks)
    with crossvit_fast_backend("triton"), spied("pool_fwd", "pool_bwd") as spies:
        with torch.set_grad_enabled(grad):
            y = model(x)
        if grad:
            y.sum().backward()
    assert len(spies["pool_fwd"].grids) == fusions
    assert len(spies["pool_bwd"].grids) == (fusions if grad else 0)


def test_ops_route_through_the_kernels_without_grad():
    """With gradients off (inference) each op still launches its Triton kernel."""
    B, N, C, H = 2, 5, 24, 2
    tokens, cls = torch.randn(B, N + 1, C, device=DEVICE), torch.randn(B, 1, C, device=DEVICE)
    nw, nb = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    wq, wk, wv, wp = (torch.randn(C, C, device=DEVICE) / C ** 0.5 for _ in range(4))
    with torch.no_grad(), spied("scores", "pool_fwd", "layer_norm_fwd", "cls_proj_fwd") as spies:
        y = ops.cls_cross_attention(cls, tokens[:, 1:], nw, nb, wq, None, wk, None, wv, None, wp,
                                    None, H, (C // H) ** -0.5, backend="triton")
        y, _ = ops.add_layer_norm(y, cls, nw, nb, backend="triton")
        ops.cls_projection(y, nw, nb, wq, nw, backend="triton")
    assert all(s.grids for s in spies.values()), {k: s.grids for k, s in spies.items()}


def test_attn_pool_more_token_groups_than_one_log_sum_exp_block():
    """B = 1 and 301 tokens on a GPU plan: 76 token groups, more than the 64 the combine reads at
    a time, so its loop over the groups' maxima and sums runs twice."""
    assert attn_pool.plan(1, 301, 24, 2, _launch.DEFAULT_NUM_SMS, None, True).token_groups(301) > 64
    check_attn_pool(tb.attn_pool_fwd, tb.attn_pool_bwd, (1, 300, 24, 2), torch.float32)


def test_layer_norm_backward_programs_take_several_row_blocks(monkeypatch):
    """The backward's programs loop over row blocks (p, p + P, ...); with one SM's worth of
    programs (3) and 100 rows in blocks of 8 (13 blocks), each takes four or five, as a GPU's do
    on a real batch, and sums its partials over its rows once at the end."""
    monkeypatch.setattr(layer_norm, "num_sms", lambda device: 1)
    M, C = 100, 200
    h, dy, dh = (torch.randn(M, C, device=DEVICE) for _ in range(3))
    w, b = 1 + 0.3 * torch.randn(C, device=DEVICE), 0.3 * torch.randn(C, device=DEVICE)
    _, _, mean, rstd = ref.layer_norm_fwd(h, None, w, b, EPS)
    with spied("layer_norm_bwd") as spies:
        got = tb.layer_norm_bwd(dy, dh, h, w, mean, rstd)
    assert layer_norm._bwd_blocks(C) == (256, 8, 4, 3)
    assert spies["layer_norm_bwd"].grids == [(3,)]
    want = ref.layer_norm_bwd(*f64(dy, dh, h, w, mean, rstd))
    for name, g, e in zip(("dx", "dweight", "dbias"), got, want):
        assert_rel_close(g, e, 1e-5, name)


# --- flash-decoding split ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [1, 3], ids=["one_split", "three_splits"])
def test_attn_pool_forced_splits(splits, dtype):
    # 151 tokens in 3 splits (of 64, 64, 23 tokens with 16-token tiles); C = 40: one channel tile
    # of 64 with 24 masked columns.
    with spied("pool_fwd", "pool_bwd", "pool_combine") as spies:
        check_attn_pool(attn_pool.attn_pool_fwd, attn_pool.attn_pool_bwd, (2, 150, 40, 3), dtype,
                        splits=splits)
    tiles = spies["pool_fwd"].grids[0][1]
    assert spies["pool_fwd"].grids == spies["pool_bwd"].grids == [(2, tiles, splits)]
    assert spies["pool_combine"].grids == ([] if splits == 1 else [(2 * 3, tiles)])


def test_attn_pool_splits_n0_and_more_splits_than_blocks():
    # Only the CLS token, and a request for more splits than there are token tiles.
    with spied("pool_fwd") as spies:
        check_attn_pool(attn_pool.attn_pool_fwd, attn_pool.attn_pool_bwd, (2, 0, 24, 2),
                        torch.float32, splits=4)
        check_attn_pool(attn_pool.attn_pool_fwd, attn_pool.attn_pool_bwd, (1, 70, 24, 2),
                        torch.float32, splits=8)
    assert [g[2] for g in spies["pool_fwd"].grids] == [1, 5]   # 71 tokens: 5 tiles of 16


@pytest.mark.parametrize("shape", [(2, 1, 100, 3), (3, 37, 72, 5), (2, 40, 20, 7), (5, 23, 130, 6)],
                         ids=["one_patch_C100", "C72_H5", "C20_H7", "C130_H6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attn_pool_channel_tiling_edges(shape, dtype):
    """Widths that leave a partial channel tile (72 = 64 + 8, 100, 130 = 2·64 + 2, 20 < one
    tile), one patch token, head counts that are not powers of two, a token count that no split
    divides (forced 3 splits), forward and backward against float64."""
    check_attn_pool(attn_pool.attn_pool_fwd, attn_pool.attn_pool_bwd, shape, dtype, splits=3)


def test_rows_with_a_large_mean_keep_fp32_accuracy():
    """The statistics merged tile by tile are as stable as a two-pass variance: tokens with a
    mean 1000 times their spread (where E[x²] − E[x]² would lose every digit in fp32) stay
    within fp32's bar, across several channel tiles."""
    x0, patches, kt, gamma, beta = pool_inputs(2, 30, 150, 3, torch.float64)
    x0, patches = x0 + 1000.0, patches + 1000.0
    args = [t.float() for t in (x0, patches, kt, gamma, beta)]
    ref_in = f64(*args)          # the fp32 inputs exactly: what is left is the kernels' rounding
    z_ref, lse_ref = ref.attn_pool_fwd(*ref_in, EPS)
    z, lse = attn_pool.attn_pool_fwd(*args, EPS)
    # fp32 arithmetic on tokens of magnitude 1000 holds their deviations from the mean to about
    # 1000 · 6e-8 = 6e-5 of a unit, as the PyTorch backend's fp32 does (4e-5 to 9e-5 here); a
    # one-pass E[x²] − E[x]² would be off by percents, and scores dotted on the raw tokens
    # (cancelling μ Σ g afterwards) by 3e-4
    tol = 1e-4
    assert_rel_close(z, z_ref, tol, "z")
    assert_rel_close(lse, lse_ref, tol, "lse")
    dz = torch.randn_like(z_ref)
    expected = ref.attn_pool_bwd(dz, *ref_in, z_ref, lse_ref, EPS)
    grads = attn_pool.attn_pool_bwd(dz.float(), *args, z, lse, EPS)
    for name, g, e in zip(("dx0", "dpatches", "dkt", "dgamma", "dbeta"), grads, expected):
        assert_rel_close(g, e, tol, name)


def test_a_huge_channel_gives_the_finite_row_aten_gives():
    """A row with one channel at 1e30 (finite fp32): its variance overflows to inf, so ATen's
    LayerNorm takes rstd = 0 and gives finite outputs; the statistics merged tile by tile do
    the same (they gave NaN: 0 · inf on the first tile), forward and backward."""
    x0, patches, kt, gamma, beta = [t.float() for t in pool_inputs(2, 30, 150, 3, torch.float64)]
    x0[0, 7] = 1e30
    patches[1, 4, 100] = 1e30
    args = (x0, patches, kt, gamma, beta, EPS)
    z, lse = attn_pool.attn_pool_fwd(*args)
    z_ref, lse_ref = ref.attn_pool_fwd(*args)
    assert torch.isfinite(z_ref).all() and torch.isfinite(lse_ref).all()
    assert torch.isfinite(z).all() and torch.isfinite(lse).all()
    assert_rel_close(z, z_ref, 1e-4, "z")
    dz = torch.randn_like(z)
    for name, g in zip(("dx0", "dpatches", "dkt", "dgamma", "dbeta"),
                       attn_pool.attn_pool_bwd(dz, *args[:5], z, lse, EPS)):
        assert torch.isfinite(g).all(), name
    ln_w, ln_b = gamma, beta
    w, b = torch.randn(40, 150, device=DEVICE) / 150 ** 0.5, torch.zeros(40, device=DEVICE)
    y, mean, rstd = tb.cls_proj_fwd(x0, ln_w, ln_b, w, b, EPS)
    y_ref = ref.cls_proj_fwd(x0, ln_w, ln_b, w, b, EPS)[0]
    assert torch.isfinite(y_ref).all() and torch.isfinite(y).all()
    assert_rel_close(y, y_ref, 1e-4, "y")
    for name, g in zip(("dx", "dln_weight", "dln_bias", "dweight", "dbias"),
                       tb.cls_proj_bwd(torch.randn_like(y), x0, ln_w, ln_b, w, mean, rstd)):
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("B", [1, 2, 5])
def test_small_batches_take_a_few_tokens_per_program(B):
    """Few samples: the token kernels take 4 or 8 tokens per program inside a 16-token tile
    (masked), the pooling kernels split the tokens; results as ever."""
    with spied("scores", "token_bwd", "pool_fwd") as spies:
        check_attn_pool(tb.attn_pool_fwd, tb.attn_pool_bwd, (B, 50, 40, 3), torch.float32)
    p = attn_pool.plan(B, 51, 40, 3, _launch.num_sms(torch.device(DEVICE)))
    assert p.tokens < p.block_n == 16 and p.splits > 1
    assert spies["scores"].grids == spies["token_bwd"].grids == [(B, -(-51 // p.tokens))]
    assert spies["pool_fwd"].grids == [(B, -(-40 // p.block_c), p.splits)]


def _programs(B, T, C, H, sms=132):
    """Programs of the token kernels and of the pooling kernels at a shape."""
    p = attn_pool.plan(B, T, C, H, sms)
    return B * p.token_groups(T), B * -(-C // p.block_c) * p.splits


def _cross_attention_shapes():
    """``(C, H, T)`` of every cross-attention the 11 variants run, at their default size."""
    from crossvit_fast.variants import list_models
    from bench.shapes import op_cases
    return sorted({(c.c_in, c.heads, c.patches + 1) for c in op_cases(list_models())
                   if c.op == "cross_attention"})


def test_the_plan_fills_the_gpu_for_every_variant():
    """From batch 8 up every launch of the token pass is at least a full wave of a 132-SM GPU,
    and at batch 256 at least 4 programs per SM (issue 19's targets)."""
    shapes = _cross_attention_shapes()
    assert len(shapes) >= 10
    for C, H, T in shapes:
        for B in (8, 16, 32, 64, 128, 256):
            token, pool = _programs(B, T, C, H)
            assert token >= 132 and pool >= 132, (C, H, T, B, token, pool)
        token, pool = _programs(256, T, C, H)
        assert token >= 4 * 132 and pool >= 4 * 132, (C, H, T, token, pool)


def test_the_plan_splits_only_what_the_batch_cannot_fill():
    sms = 132
    assert attn_pool.plan(256, 401, 224, 7, sms).splits == 1
    p = attn_pool.plan(1, 401, 224, 7, sms)
    assert p.splits > 1 and (p.splits - 1) * p.chunk < 401 <= p.splits * p.chunk
    assert p.chunk % p.block_n == 0 and p.chunk >= attn_pool.MIN_SPLIT_TOKENS
    assert attn_pool.plan(1, 20, 224, 7, sms).splits == 1     # too few tokens to split


# --- shapes and dtypes ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [224, 448])
def test_attn_pool_crossvit18_widths(C, dtype):
    check_attn_pool(tb.attn_pool_fwd, tb.attn_pool_bwd, (2, 37, C, 7), dtype)


@pytest.mark.parametrize("shape", [(2, 11, 48, 16), (1, 20, 20, 1)], ids=str)
def test_attn_pool_head_counts(shape):
    check_attn_pool(tb.attn_pool_fwd, tb.attn_pool_bwd, shape, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_448_strided_rows(dtype):
    big = torch.randn(3, 2 * 448, device=DEVICE).to(dtype)
    x, res = big[:, :448], big[:, 448:]                     # rows with a row stride of 896
    w, b = 1 + 0.3 * torch.randn(448, device=DEVICE), 0.3 * torch.randn(448, device=DEVICE)
    y_ref, h_ref, mean_ref, rstd_ref = ref.layer_norm_fwd(*f64(x, res, w, b), EPS)
    tol = tolerance(dtype, [rel_err(y_ref.to(dtype), y_ref)] if dtype != torch.float32 else [])
    y, h, mean, rstd = tb.layer_norm_fwd(x, res, w, b, EPS)
    for name, a, e in (("y", y, y_ref), ("h", h, h_ref), ("mean", mean, mean_ref), ("rstd", rstd, rstd_ref)):
        assert_rel_close(a, e, tol, name)
    dy = torch.randn(3, 2 * 448, device=DEVICE, dtype=torch.float64)[:, ::2]
    expected = ref.layer_norm_bwd(dy, None, h_ref, w.double(), mean_ref, rstd_ref)
    grads = tb.layer_norm_bwd(dy.to(dtype), None, h, w, mean, rstd)
    for name, g, e in zip(("dx", "dweight", "dbias"), grads, expected):
        assert_rel_close(g, e, max(tol, tolerance(dtype, [2 * rel_err(dy.to(dtype), dy)])), name)


def test_cls_proj_puts_rows_on_the_unlimited_grid_axis():
    """The row blocks go on grid axis 0 (up to 2**31 - 1 programs; axes 1 and 2 stop at 65535,
    about a million rows of 16): the public op flattens any ``[..., Cin]`` input into rows."""
    x = torch.randn(50, 24, device=DEVICE)
    with spied("cls_proj_fwd") as spies:
        tb.cls_proj_fwd(x, torch.ones(24, device=DEVICE), torch.zeros(24, device=DEVICE),
                        torch.randn(72, 24, device=DEVICE), torch.zeros(72, device=DEVICE), EPS)
    assert spies["cls_proj_fwd"].grids == [(4, 3)]   # cdiv(50 rows, 16), cdiv(72 outputs, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 448, 224), (17, 100, 72), (2, 20, 200), (5, 130, 20)],
                         ids=["crossvit_18", "rows_over_a_block", "narrow_in", "narrow_out"])
def test_cls_proj_tiling_edges(shape, dtype):
    """Widths that are not multiples of the channel tiles (64 in, 32 out), more rows than a
    block, and a row mean of 5 (the statistics merged tile by tile must not lose it)."""
    M, Cin, Cout = shape
    tokens = (5 + torch.randn(M, 2, Cin, device=DEVICE)).to(dtype)
    x = tokens[:, 0]
    ln_w, ln_b = 1 + 0.3 * torch.randn(Cin, device=DEVICE), 0.3 * torch.randn(Cin, device=DEVICE)
    w, b = torch.randn(Cout, Cin, device=DEVICE) / Cin ** 0.5, 0.1 * torch.randn(Cout, device=DEVICE)
    ref_in = f64(x, ln_w, ln_b, w, b)
    y_ref, mean_ref, rstd_ref = ref.cls_proj_fwd(*ref_in, EPS)
    lowp = dtype != torch.float32
    tol = tolerance(dtype, [torch_lowp_error(naive_cls_proj, ref_in, dtype)] if lowp else [])
    y, mean, rstd = tb.cls_proj_fwd(x, ln_w, ln_b, w, b, EPS)
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(mean, mean_ref, tol, "mean")
    assert_rel_close(rstd, rstd_ref, tol, "rstd")
    dy = torch.randn(M, Cout, device=DEVICE, dtype=torch.float64)
    expected = ref.cls_proj_bwd(dy, *ref_in[:4], mean_ref, rstd_ref)
    if lowp:
        naive_grads = lambda *a: torch.autograd.grad(naive_cls_proj(*a), a, dy.to(a[0].dtype))  # noqa: E731
        tol = tolerance(dtype, [torch_lowp_error(naive_grads, [t.requires_grad_() for t in ref_in], dtype)])
    grads = tb.cls_proj_bwd(dy.to(dtype), x, ln_w, ln_b, w, mean, rstd)
    for name, g, e in zip(("dx", "dln_weight", "dln_bias", "dweight", "dbias"), grads, expected):
        assert_rel_close(g, e, tol, name)


def test_float64_matches_the_reference_to_rounding():
    """float64 activations accumulate in float64 (what gradcheck of the ops relies on)."""
    x0, patches, kt, gamma, beta = pool_inputs(2, 9, 20, 3, torch.float64)
    z, lse = tb.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS)
    z_ref, lse_ref = ref.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS)
    dz = torch.randn_like(z)
    got = [z, lse, *tb.attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z, lse, EPS)]
    want = [z_ref, lse_ref, *ref.attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z_ref, lse_ref, EPS)]
    rows, pw = (torch.randn(*s, device=DEVICE, dtype=torch.float64) for s in ((5, 20), (12, 20)))
    w, b = (torch.rand(20, device=DEVICE, dtype=torch.float64) + k for k in (1, 0))
    for impl, out in ((tb, got), (ref, want)):
        y, h, mean, rstd = impl.layer_norm_fwd(rows, rows, w, b, EPS)
        out += [y, h, mean, rstd, *impl.layer_norm_bwd(rows, rows, h, w, mean, rstd)]
        y, mean, rstd = impl.cls_proj_fwd(rows, w, b, pw, b[:12], EPS)
        out += [y, *impl.cls_proj_bwd(y, rows, w, b, pw, mean, rstd)]
    assert len(got) == len(want) == 20
    for g, e in zip(got, want):
        assert g.dtype == torch.float64
        assert rel_err(g, e) < 1e-12


def test_patches_without_unit_stride_and_strided_x0():
    tokens = torch.randn(2, 24, 10, device=DEVICE).transpose(1, 2)   # [B, N+1, C], stride(-1) = 10
    x0, patches = tokens[:, 0], tokens[:, 1:]
    kt = torch.randn(2, 3, 24, device=DEVICE) / 5
    gamma, beta = 1 + torch.rand(24, device=DEVICE), torch.rand(24, device=DEVICE)
    z, lse = tb.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS)
    z_ref, lse_ref = ref.attn_pool_fwd(*f64(x0, patches, kt, gamma, beta), EPS)
    assert_rel_close(z, z_ref, 1e-5, "z")
    assert_rel_close(lse, lse_ref, 1e-5, "lse")


def test_tokens_past_32_bit_offsets_are_copied_before_the_kernels_see_them():
    """The kernels index a sample's tokens in 32 bits: a view whose token stride times its token
    count passes 2**31 elements (a sequence-first view of a huge batch) is made contiguous; an
    ordinary view is passed as it is. (Meta tensors: no 4 GiB buffer needed.)"""
    from crossvit_fast.kernels import attn_pool
    from crossvit_fast.kernels._launch import token_rows
    B, N, C = 2, 3, 16
    huge = torch.empty_strided((B, N, C), (C, 2 ** 30 + C, 1), device="meta", dtype=torch.float16)
    assert token_rows(huge).stride() == (N * C, C, 1)
    near = torch.empty_strided((B, N, C), (C, 2 ** 29, 1), device="meta", dtype=torch.float16)
    assert token_rows(near) is near     # 3 * 2**29 < 2**31
    view = torch.randn(B, N + 1, C)[:, 1:]
    assert token_rows(view) is view
    x0, kt = torch.empty(B, C, device="meta"), torch.empty(B, 2, C, device="meta")
    assert attn_pool._prepare(x0, huge, kt)[1].stride() == (N * C, C, 1)


def test_heads_first_kt_and_dz_views_read_in_place():
    # The op passes kt and dz as [B, H, C] views of [H, B, C] products (no copy): same results
    # as contiguous ones, forward and backward.
    B, N, C, H = 3, 20, 24, 2
    x0, patches = torch.randn(B, C, device=DEVICE), torch.randn(B, N, C, device=DEVICE)
    kt = (torch.randn(H, B, C, device=DEVICE) / 5).transpose(0, 1)
    dz = torch.randn(H, B, C, device=DEVICE).transpose(0, 1)
    gamma, beta = 1 + torch.rand(C, device=DEVICE), torch.rand(C, device=DEVICE)
    assert not kt.is_contiguous() and not dz.is_contiguous()
    z, lse = tb.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS)
    z_ref, lse_ref = ref.attn_pool_fwd(*f64(x0, patches, kt, gamma, beta), EPS)
    assert_rel_close(z, z_ref, 1e-5, "z")
    assert_rel_close(lse, lse_ref, 1e-5, "lse")
    got = tb.attn_pool_bwd(dz, x0, patches, kt, gamma, beta, z, lse, EPS)
    want = ref.attn_pool_bwd(*f64(dz, x0, patches, kt, gamma, beta, z_ref, lse_ref), EPS)
    for name, g, e in zip(("dx0", "dpatches", "dkt", "dgamma", "dbeta"), got, want):
        assert_rel_close(g, e, 1e-5, name)


def test_unavailable_reason(monkeypatch):
    assert tb.unavailable_reason(torch.device("cpu" if DEVICE == "cpu" else "cuda")) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in tb.unavailable_reason(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert "CUDA" in tb.unavailable_reason(torch.device("cuda"))
    assert tb.unavailable_reason(torch.device("meta")) is not None


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs CPU tensors")
@pytest.mark.parametrize("value", ["true", "on", "YES"])
def test_the_interpreter_is_recognised_as_triton_reads_the_variable(monkeypatch, value):
    """Triton interprets for TRITON_INTERPRET=true/on/yes too (was: 'not set' for all but 1)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert tb.unavailable_reason(torch.device("cpu")) is None


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False),
    ("3.10.0+git1", "2.10.0", False), ("2.9.0", "3.0.0", True)])
def test_an_interpreter_that_cannot_run_with_this_numpy_says_so(monkeypatch, triton_version,
                                                                   numpy_version, refused):
    """Triton 3.6's interpreter with numpy 2.4 (was: a TypeError inside every kernel that indexes
    with a loaded value)."""
    import numpy
    import triton
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = tb.interpreter_numpy_conflict()
    if refused:
        assert reason == (f"Triton {triton_version}'s CPU interpreter needs numpy below 2.4, and numpy "
                          f"{numpy_version} is installed: pip install 'numpy<2.4' (or Triton 3.7 or newer)")
        if DEVICE == "cpu":
            assert tb.unavailable_reason(torch.device("cpu")) == reason
    else:
        assert reason is None


def test_gpus_older_than_the_a100_are_refused_with_the_reason(monkeypatch):
    """The kernels are built and checked for sm_80 and up (bench.kernel_resources): an older GPU
    gets one clear reason, and ``auto`` then takes the next backend."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    reason = tb.unavailable_reason(torch.device("cuda"))
    assert "8.0 (A100) or newer" in reason and "Tesla T4 is 7.5" in reason
    # The CUDA backend is stubbed as available: asking the real one would build the extension
    # for the faked sm_75 (minutes of nvcc on a GPU machine, a failure cached for the process).
    monkeypatch.setattr(backends, "_unavailable_reason", lambda name, device: (
        reason if name == "triton" else None))
    assert backends.resolve("auto", "cuda") == "cuda"
    with pytest.raises(backends.BackendUnavailableError, match="Tesla T4 is 7.5"):
        backends.resolve("triton", "cuda")


def test_op_with_no_samples():
    C, H = 24, 2
    tokens = torch.randn(0, 6, C, device=DEVICE, requires_grad=True)
    cls = torch.randn(0, 1, C, device=DEVICE, requires_grad=True)
    nw, nb = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE, requires_grad=True)
    w = [torch.randn(C, C, device=DEVICE, requires_grad=True) for _ in range(4)]
    y = ops.cls_cross_attention(cls, tokens[:, 1:], nw, nb, w[0], None, w[1], None, w[2], None,
                                w[3], None, H, (C // H) ** -0.5, backend="triton")
    assert y.shape == (0, 1, C)
    grads = torch.autograd.grad(y.sum(), (cls, tokens, nb, *w))
    assert all(g.abs().sum() == 0 for g in grads)
