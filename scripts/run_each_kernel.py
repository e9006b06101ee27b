"""Run every fused op of one backend once, forward and backward (the attention maps forward
only), at a few small shapes.

A small, quick workload for ``compute-sanitizer`` (memcheck, racecheck) on a GPU machine:

    compute-sanitizer --tool memcheck python scripts/run_each_kernel.py --backend triton

The shapes cover the awkward cases (B = 1 with a split token axis, odd token counts, widths that
are not multiples of 16, a strided patch view, fp32/fp16/bf16); the results are checked for
finiteness only: correctness is the tests' job.
"""
import argparse

import torch

from crossvit_fast import ops

SHAPES = [(1, 401, 224, 7), (3, 197, 96, 3), (2, 17, 40, 2)]   # (B, N, C, heads)


def run(backend: str, dtype: torch.dtype, B: int, N: int, C: int, H: int) -> None:
    dev = "cuda"
    tokens = torch.randn(B, N + 1, C, device=dev, dtype=dtype, requires_grad=True)
    cls = torch.randn(B, 1, C, device=dev, dtype=dtype, requires_grad=True)
    params = [torch.randn(C, C, device=dev, requires_grad=True) for _ in range(4)]
    nw = torch.ones(C, device=dev, requires_grad=True)
    nb = torch.zeros(C, device=dev, requires_grad=True)
    y = ops.cls_cross_attention(cls, tokens[:, 1:], nw, nb, params[0], None, params[1], None,
                                params[2], None, params[3], None, H, (C // H) ** -0.5,
                                backend=backend)
    y, h = ops.add_layer_norm(y, cls, nw, nb, backend=backend)
    z = ops.cls_projection(y, nw, nb, params[0][: C // 2], nb[: C // 2], backend=backend)
    t = ops.layer_norm(tokens, nw, nb, backend=backend)
    maps = ops.cls_attention_maps(cls, tokens[:, 1:], nw, nb, params[0], None, params[1], H,
                                  (C // H) ** -0.5, backend=backend)
    (z.float().sum() + h.float().sum() + t.float().sum()).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(maps).all(), "non-finite attention map"
    grads = [tokens.grad, cls.grad, nw.grad, nb.grad, *(p.grad for p in params)]
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"


def run_cls_exchange(dtype: torch.dtype, B: int, N: int, C: int, H: int) -> None:
    """The fused CLS exchange kernel (Triton only, inference): branch 0 of width C // 2 against
    N patches of width C, its CLS row written over in place, as the model writes it."""
    from crossvit_fast.kernels import cls_exchange as ex
    dev, Ci = "cuda", C // 2

    def r(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype) * shape[-1] ** -0.5

    def projection(c_in, c_out):
        return ex.Projection(r(c_in) + 1, r(c_in), 1e-6, r(c_out, c_in), r(c_out))
    attn = ex.CrossAttention(r(C) + 1, r(C), 1e-6, r(C, C), r(C), r(C, C), r(C, C), None, r(C, C),
                             r(C), H, (C // H) ** -0.5)
    own = torch.randn(B, 5, Ci, device=dev, dtype=dtype)
    other = torch.randn(B, N + 1, C, device=dev, dtype=dtype)
    ex.cls_exchange(own[:, 0], other[:, 1:], own[:, 0], projection(Ci, C), attn, projection(C, Ci))
    torch.cuda.synchronize()
    assert torch.isfinite(own).all(), "non-finite exchanged CLS row"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True, choices=["triton", "cuda", "torch"])
    args = parser.parse_args()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in SHAPES:
            run(args.backend, dtype, *shape)
            if args.backend == "triton":
                run_cls_exchange(dtype, *shape)
    # fp32 tokens under bf16 autocast: the token pass's bf16-dot variant
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for shape in SHAPES:
            run(args.backend, torch.float32, *shape)
    print(f"{args.backend}: every op ran forward and backward at {len(SHAPES)} shapes x 3 dtypes "
          "and fp32 under bf16 autocast" + (", the fused CLS exchange at each shape and dtype"
                                            if args.backend == "triton" else ""))


if __name__ == "__main__":
    main()
