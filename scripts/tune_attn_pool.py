"""Where the fused ops' time goes on a GPU, and which token-pass configuration is fastest.

Three measurements, printed as tables (GPU only; ``--check`` runs the correctness part on the
CPU under ``TRITON_INTERPRET=1``):

1. ``sweep``: the cross-attention token pass alone (``triton.testing.do_bench``, GPU time) at
   crossvit_18_240's two shapes, over BLOCK_N, num_warps, num_stages and token splits, for the
   shipped kernel (``normalized``: dots on the normalized tile) and the ``raw`` formulation
   (dots on the tokens as loaded, LayerNorm folded into the scores and weights:
   ``Σ_j p_j r_j (x_j − μ_j)``), so that no normalized copy of the tile is formed.
2. ``overhead``: each op's GPU time (back-to-back calls) against its latency with a
   synchronize per call and the host time per call, to split launch cost from kernel time.
3. ``layernorm``: the LayerNorm kernel against ``F.layer_norm`` (GPU time).

    python scripts/tune_attn_pool.py [sweep overhead layernorm] [--kinds normalized]
    TRITON_INTERPRET=1 python scripts/tune_attn_pool.py --check
"""
from __future__ import annotations

import itertools
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from crossvit_fast import ops
from crossvit_fast.backends import torch_backend
from crossvit_fast.kernels import attn_pool
from crossvit_fast.kernels.attn_pool import _head_params, _scores, _token_ptrs

SHAPES = [(256, 196, 448, 7), (256, 400, 224, 7)]   # B, N, C, H: crossvit_18_240 at batch 256
KINDS = ("normalized", "raw")
EPS = 1e-6


@triton.jit(do_not_specialize=["T", "chunk"])
def _fwd_raw_kernel(x0_ptr, p_ptr, kt_ptr, gamma_ptr, beta_ptr, out_ptr, lse_ptr, l_ptr,
                    T, C, H, chunk, s_x0b, s_pb, s_pn, s_ktb, s_kth, eps,
                    H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                    ACC: tl.constexpr, DOT: tl.constexpr):
    """The token pass with both dots on the loaded tokens: ``acc += (p r) @ x`` and
    ``accmu += Σ (p r) μ`` (of the rounded ``p r``), so ``acc − accmu = Σ p n``. Writes the
    unnormalized partials of each split, as the shipped kernel does with several splits."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    heads = tl.arange(0, H_PAD)
    cols = tl.arange(0, BLOCK_C)
    kt, gamma, beta, g, gsum, kb, hc_mask = _head_params(kt_ptr, s_ktb, s_kth, gamma_ptr, beta_ptr,
                                                         b, heads, cols, H, C, ACC, DOT)
    m = tl.full([H_PAD], float("-inf"), ACC)
    l = tl.zeros([H_PAD], ACC)
    mu = tl.zeros([H_PAD], ACC)
    acc = tl.zeros([H_PAD, BLOCK_C], ACC)
    start = split * chunk
    end = tl.minimum(start + chunk, T)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        ptrs, mask = _token_ptrs(x0_ptr, p_ptr, b, t, cols, end, C, s_x0b, s_pb, s_pn)
        x = tl.load(ptrs, mask=mask, other=0.0)
        xf = x.to(ACC)
        mean = tl.sum(xf, 1) / C
        xc = tl.where(mask, xf - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
        s = tl.where((t < end)[None, :], _scores(g, gsum, kb, x, x, mean, rstd, DOT, False),
                     float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        pr = (p * rstd[None, :]).to(DOT)
        mu = mu * alpha + tl.sum(pr.to(ACC) * mean[None, :], 1)
        acc = acc * alpha[:, None] + tl.dot(pr, x.to(DOT), input_precision="ieee")
        m = m_new
    row = b * tl.num_programs(1) + split
    tl.store(out_ptr + (row * H + heads[:, None]) * C + cols[None, :], acc - mu[:, None], mask=hc_mask)
    tl.store(lse_ptr + row * H + heads, m, mask=heads < H)
    tl.store(l_ptr + row * H + heads, l, mask=heads < H)


def _inputs(B, N, C, H, dtype, device):
    tokens = torch.randn(B, N + 1, C, device=device, dtype=dtype) * 2 + 0.5
    kt = torch.randn(B, H, C, device=device) / C ** 0.5
    gamma = 1 + 0.1 * torch.randn(C, device=device)
    beta = 0.1 * torch.randn(C, device=device)
    return tokens[:, 0], tokens[:, 1:], kt, gamma, beta


def _launch(kind, x0, patches, kt, gamma, beta, block_n, warps, stages, splits, dot_dtype=None):
    """One launch with partial outputs; returns a callable and the combine of its outputs."""
    B, N, C = patches.shape
    H = kt.shape[1]
    ACC, DOT, ON_N = attn_pool._tl_dtypes(x0.dtype, dot_dtype)
    block_c, h_pad = max(16, triton.next_power_of_2(C)), max(16, triton.next_power_of_2(H))
    S, chunk = attn_pool._splits(B, N + 1, block_n, x0.device, splits)
    out = x0.new_empty((B, S, H, C), dtype=torch.float32)
    m, l = x0.new_empty((2, B, S, H), dtype=torch.float32)
    args = (x0, patches, kt, gamma, beta, out, m, l)
    strides = (N + 1, C, H, chunk, x0.stride(0), patches.stride(0), patches.stride(1),
               kt.stride(0), kt.stride(1), EPS)
    meta = dict(H_PAD=h_pad, BLOCK_N=block_n, BLOCK_C=block_c, ACC=ACC, DOT=DOT,
                num_warps=warps, num_stages=stages)
    if kind == "raw":
        run = lambda: _fwd_raw_kernel[(B, S)](*args, *strides, **meta)  # noqa: E731
    else:
        run = lambda: attn_pool._attn_pool_fwd_kernel[(B, S)](*args, *strides, SCORES_ON_N=ON_N,  # noqa: E731
                                                              FINAL=False, **meta)

    def combine():
        m_all = m.amax(dim=1)
        w = torch.exp(m - m_all.unsqueeze(1))
        return torch.einsum("bsh,bshc->bhc", w, out) / (w * l).sum(1).unsqueeze(-1) * gamma + beta
    return run, combine


def check() -> None:
    """Both formulations against the float64 PyTorch token pass, at small shapes."""
    for kind, dtype, (B, N, C, H) in itertools.product(("normalized", "raw"), (torch.float32, torch.float16),
                                                        [(2, 37, 96, 3), (3, 50, 224, 7)]):
        x0, patches, kt, gamma, beta = _inputs(B, N, C, H, dtype, "cpu")
        run, combine = _launch(kind, x0, patches, kt, gamma, beta, 16, 4, 1, 2)
        run()
        z_ref, _ = torch_backend.attn_pool_fwd(x0.double(), patches.double(), kt.double(),
                                               gamma.double(), beta.double(), EPS)
        err = ((combine().double() - z_ref).abs().max() / z_ref.abs().max()).item()
        bar = 1e-5 if dtype == torch.float32 else 2e-3
        print(f"check {kind:10s} {str(dtype):14s} B={B} N={N} C={C} H={H}: rel err {err:.2e} "
              f"{'ok' if err < bar else 'FAIL'}")
        assert err < bar


def sweep() -> None:
    from triton.testing import do_bench
    print("kind,dtype,B,N,C,H,block_n,warps,stages,splits,us,GBps")
    # fp32 tokens with bf16 dots: the model under bf16 autocast (its residual stream is fp32)
    for (B, N, C, H), (dtype, dot) in itertools.product(
            SHAPES, ((torch.bfloat16, None), (torch.float32, torch.bfloat16), (torch.float32, None))):
        x0, patches, kt, gamma, beta = _inputs(B, N, C, H, dtype, "cuda")
        nbytes = B * (N + 1) * C * x0.element_size()
        best = {}
        for kind, block_n, warps, stages, splits in itertools.product(
                KINDS, (16, 32), (4, 8), (1,), (1, 2, 4)):
            if block_n * max(256, triton.next_power_of_2(C)) > 16384:
                continue
            try:
                run, _ = _launch(kind, x0, patches, kt, gamma, beta, block_n, warps, stages, splits, dot)
                us = do_bench(run, warmup=5, rep=20) * 1e3
            except Exception as err:  # noqa: BLE001 (OutOfResources and compile errors alike)
                print(f"{kind},{dtype},{B},{N},{C},{H},{block_n},{warps},{stages},{splits},"
                      f"error: {type(err).__name__}")
                continue
            print(f"{kind},{str(dtype)[6:]}{'+' + str(dot)[6:] + ' dots' if dot else ''},{B},{N},{C},{H},{block_n},{warps},{stages},{splits},"
                  f"{us:.1f},{nbytes / us / 1e3:.0f}", flush=True)
            if us < best.get(kind, (1e9,))[0]:
                best[kind] = (us, block_n, warps, stages, splits)
        print(f"# best B={B} N={N} C={C} {dtype} dots {dot or dtype}: {best}", flush=True)


def overhead() -> None:
    """GPU time vs synced latency vs host time per call, for the fused ops and the naive ones."""
    from triton.testing import do_bench
    from crossvit_fast import reference
    B, N, C, H = 256, 196, 448, 7
    dev, dt = "cuda", torch.bfloat16
    tokens = torch.randn(B, N + 1, C, device=dev, dtype=dt)
    cls = torch.randn(B, 1, C, device=dev, dtype=dt)
    nw, nb = torch.ones(C, device=dev, dtype=dt), torch.zeros(C, device=dev, dtype=dt)
    w = [(torch.randn(C, C, device=dev) / C ** 0.5).to(dt) for _ in range(4)]
    b = [torch.zeros(C, device=dev, dtype=dt) for _ in range(4)]
    args = (cls, tokens[:, 1:], nw, nb, w[0], b[0], w[1], b[1], w[2], b[2], w[3], b[3], H, (C // H) ** -0.5)
    res = torch.randn_like(tokens)
    calls = {
        "cross_attention naive": lambda: reference.cls_cross_attention(*args),
        "add_layer_norm naive": lambda: F.layer_norm(tokens + res, (C,), nw, nb, EPS),
    }
    for backend in ("triton", "torch"):
        calls[f"cross_attention {backend}"] = lambda be=backend: ops.cls_cross_attention(*args, backend=be)
        calls[f"add_layer_norm {backend}"] = lambda be=backend: ops.add_layer_norm(tokens, res, nw, nb, backend=be)
    print("op,gpu_us(do_bench),synced_latency_us,host_us_per_call")
    for name, fn in calls.items():
        try:
            gpu = do_bench(fn, warmup=10, rep=50) * 1e3
        except Exception as err:  # noqa: BLE001
            print(f"{name},error {type(err).__name__}: {err}")
            continue
        lat = []
        for _ in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            lat.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        host = (time.perf_counter() - t0) / 50
        torch.cuda.synchronize()
        print(f"{name},{gpu:.1f},{sorted(lat)[10] * 1e6:.1f},{host * 1e6:.1f}", flush=True)


def layernorm() -> None:
    from triton.testing import do_bench
    from crossvit_fast.kernels import layer_norm
    print("M,C,dtype,impl,us,GBps")
    for (M, C), dt in itertools.product([(256 * 401, 224), (256 * 197, 448)], (torch.bfloat16, torch.float32)):
        x = torch.randn(M, C, device="cuda", dtype=dt)
        r = torch.randn_like(x)
        w, bb = torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
        nbytes = 4 * x.numel() * x.element_size()
        for name, fn in (("F.layer_norm(x+r)", lambda: F.layer_norm(x + r, (C,), w.to(dt), bb.to(dt), EPS)),
                         ("triton add+LN", lambda: layer_norm.layer_norm_fwd(x, r, w, bb, EPS))):
            us = do_bench(fn, warmup=10, rep=50) * 1e3
            print(f"{M},{C},{str(dt)[6:]},{name},{us:.1f},{nbytes / us / 1e3:.0f}", flush=True)


if __name__ == "__main__":
    if "--kinds" in sys.argv:
        KINDS = tuple(sys.argv.pop(sys.argv.index("--kinds") + 1).split(","))
        sys.argv.remove("--kinds")
    if "--check" in sys.argv:
        check()
    else:
        for part in sys.argv[1:] or ["sweep", "overhead", "layernorm"]:
            {"sweep": sweep, "overhead": overhead, "layernorm": layernorm}[part]()
