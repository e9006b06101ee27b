"""The CUDA token pass's shared-memory plan fits every GPU from the A100 on, at every variant,
and all but crossvit_base's widest branch on a Turing GPU.

bench.cuda_plan builds a host program on ``csrc/attn_pool_plan.h`` (the formulas attn_pool.cu
launches with) and prints the forward's and backward's bytes for each variant's cross-attention
(C, H); each must fit the per-block opt-in limit of sm_80, sm_86, sm_89 and sm_90, or the cuda
backend would run the shape on the torch backend there. The cuda backend is what ``auto`` picks
on GPUs older than the A100 (the Triton kernels need 8.0): on Turing (sm_75, 64 KiB per block, the
oldest GPU nvcc 13 builds for) crossvit_base's C = 768, H = 12 does not fit, and runs the torch
backend with a warning (tests/test_backends.py).
"""
import pytest

from bench import cuda_plan
from bench.kernel_resources import TARGETS
from crossvit_fast.variants import MODEL_ARGS

# cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes (bench.kernel_resources.TARGETS).
SMEM_LIMITS = {f"sm_{cc}": limit for cc, (_, _, limit) in TARGETS.items()}
TURING_SMEM_LIMIT = 65536   # sm_75 (T4, RTX 20xx)


@pytest.fixture(scope="module")
def plans():
    if not cuda_plan.host_compiler():
        pytest.skip("no host C++ compiler (g++ / c++) on PATH")
    shapes = cuda_plan.variant_shapes()
    table = cuda_plan.plan_table(shapes)
    assert sorted(table) == shapes
    return table


def test_every_variant_is_covered(plans):
    # 11 variants, 6 distinct widths per branch pair; crossvit_base's wide branch is the widest.
    assert len(MODEL_ARGS) == 11
    assert (768, 12) in plans and max(plans) == (768, 12)


@pytest.mark.parametrize("arch", sorted(SMEM_LIMITS))
def test_shared_memory_fits(plans, arch):
    limit = SMEM_LIMITS[arch]
    report = "\n".join(f"  C={C:4d} H={H:2d}: fwd {p['fwd_bytes']:6d} B, bwd {p['bwd_bytes']:6d} B"
                       for (C, H), p in sorted(plans.items()))
    too_big = [(C, H, kind, p[f"{kind}_bytes"]) for (C, H), p in sorted(plans.items())
               for kind in ("fwd", "bwd") if p[f"{kind}_bytes"] > limit]
    assert not too_big, (f"{arch} allows {limit} bytes of shared memory per block; these token "
                         f"passes need more: {too_big}\nplan:\n{report}")


def test_on_turing_only_crossvit_base_wide_branch_is_too_big(plans):
    too_big = {(C, H) for (C, H), p in plans.items()
               if max(p["fwd_bytes"], p["bwd_bytes"]) > TURING_SMEM_LIMIT}
    assert too_big == {(768, 12)}, too_big


def test_launch_shape_covers_the_width(plans):
    # One thread per column quad (forward) / pair (backward), whole warps; heads padded up.
    for (C, H), p in plans.items():
        assert p["hmax"] in (4, 8, 16) and p["hmax"] >= H
        assert p["fwd_threads"] % 32 == 0 and 4 * p["fwd_threads"] >= C
        assert p["bwd_threads"] % 32 == 0 and 2 * p["bwd_threads"] >= C
