"""Where the fused ops' time goes on a GPU, and which token-pass configuration is fastest.

Three measurements, printed as tables (GPU only; ``--check`` runs the correctness part on the
CPU under ``TRITON_INTERPRET=1``):

1. ``sweep``: the cross-attention's forward token pass alone (``triton.testing.do_bench``, GPU
   time) at crossvit_18_240's two shapes and batch 256, over num_warps, software-pipeline stages
   and token splits (the tiles are the plan's), for bf16 tokens and fp32 tokens with bf16 dots
   (the model under autocast).
2. ``overhead``: each op's ``do_bench`` time (back-to-back calls: the GPU time, unless the host
   is slower), its latency with a synchronize per call, and the host time per call.
3. ``layernorm``: the LayerNorm kernel against ``F.layer_norm`` (GPU time).

    python scripts/tune_attn_pool.py [sweep overhead layernorm]
    TRITON_INTERPRET=1 python scripts/tune_attn_pool.py --check
"""
from __future__ import annotations

import contextlib
import itertools
import sys
import time

import torch
import torch.nn.functional as F

from crossvit_fast import ops
from crossvit_fast.backends import torch_backend
from crossvit_fast.kernels import attn_pool

SHAPES = [(256, 196, 448, 7), (256, 400, 224, 7)]   # B, N, C, H: crossvit_18_240 at batch 256
EPS = 1e-6


def _inputs(B, N, C, H, dtype, device):
    tokens = torch.randn(B, N + 1, C, device=device, dtype=dtype) * 2 + 0.5
    kt = torch.randn(B, H, C, device=device) / C ** 0.5
    gamma = 1 + 0.1 * torch.randn(C, device=device)
    beta = 0.1 * torch.randn(C, device=device)
    return tokens[:, 0], tokens[:, 1:], kt, gamma, beta


@contextlib.contextmanager
def _launch_options(warps: int, stages: int):
    """Every token-pass kernel launched with ``warps`` warps and ``stages`` pipeline stages (the
    plan's tiles otherwise)."""
    plan_for, saved_stages = attn_pool._plan_for, attn_pool.NUM_STAGES
    attn_pool._plan_for = lambda *args: plan_for(*args)._replace(warps=warps, token_warps=warps,
                                                                 token_stages=stages)
    attn_pool.NUM_STAGES = stages
    try:
        yield
    finally:
        attn_pool._plan_for, attn_pool.NUM_STAGES = plan_for, saved_stages


def _configs():
    """(warps, stages, splits): splits None is the plan's own choice."""
    return itertools.product((4, 8), (1, 2, 3), (None, 1, 2, 4))


def check() -> None:
    """Every configuration the sweep times, against the float64 PyTorch token pass at small
    shapes."""
    for dtype, (B, N, C, H) in itertools.product((torch.float32, torch.float16),
                                                 [(2, 37, 96, 3), (3, 50, 224, 7)]):
        x0, patches, kt, gamma, beta = _inputs(B, N, C, H, dtype, "cpu")
        z_ref, _ = torch_backend.attn_pool_fwd(x0.double(), patches.double(), kt.double(),
                                               gamma.double(), beta.double(), EPS)
        for warps, stages, splits in _configs():
            with _launch_options(warps, stages):
                z, _ = attn_pool.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS, splits=splits)
            err = ((z.double() - z_ref).abs().max() / z_ref.abs().max()).item()
            bar = 1e-5 if dtype == torch.float32 else 2e-3
            print(f"check {str(dtype):14s} B={B} N={N} C={C} H={H} warps={warps} stages={stages} "
                  f"splits={splits}: rel err {err:.2e} {'ok' if err < bar else 'FAIL'}")
            assert err < bar


def sweep() -> None:
    """The whole forward token pass (scores, pooling, combine) over warps, stages and splits."""
    from triton.testing import do_bench
    print("tokens,B,N,C,H,warps,stages,splits,us,GBps")
    # fp32 tokens with bf16 dots: the model under bf16 autocast (its residual stream is fp32)
    for (B, N, C, H), (dtype, dot) in itertools.product(
            SHAPES, ((torch.bfloat16, None), (torch.float32, torch.bfloat16))):
        x0, patches, kt, gamma, beta = _inputs(B, N, C, H, dtype, "cuda")
        nbytes = B * (N + 1) * C * x0.element_size()
        label = str(dtype)[6:] + (f"+{str(dot)[6:]} dots" if dot else "")
        best = (float("inf"),)
        for warps, stages, splits in _configs():
            config = f"{label},{B},{N},{C},{H},{warps},{stages},{splits or 'plan'}"
            with _launch_options(warps, stages):
                us = do_bench(lambda: attn_pool.attn_pool_fwd(x0, patches, kt, gamma, beta, EPS, dot,
                                                              splits=splits),
                              warmup=5, rep=20) * 1e3
            print(f"{config},{us:.1f},{nbytes / us / 1e3:.0f}", flush=True)
            best = min(best, (us, warps, stages, splits or 0))
        print(f"# best {label} B={B} N={N} C={C}: (us, warps, stages, splits (0: plan)) = {best}",
              flush=True)


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
    if "--check" in sys.argv:
        check()
    else:
        for part in sys.argv[1:] or ["sweep", "overhead", "layernorm"]:
            {"sweep": sweep, "overhead": overhead, "layernorm": layernorm}[part]()
