"""The CUDA token pass's shared-memory plan fits every GPU from the A100 on, at every variant.

``csrc/attn_pool_plan.h`` holds the formulas attn_pool.cu launches with (tiles, block sizes, head
padding, bytes of dynamic shared memory). A tiny host program including it, built with the host
C++ compiler (no CUDA needed), prints the forward's and backward's bytes for each variant's
cross-attention (C, H); each must fit the per-block opt-in limit of sm_80, sm_86, sm_89 and sm_90,
or the cuda backend would refuse the shape there ("Use the triton or torch backend").
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from crossvit_fast import _extension
from crossvit_fast.variants import MODEL_ARGS

CSRC = _extension.sources()[0].parent
CXX = shutil.which("g++") or shutil.which("c++")

# cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes.
SMEM_LIMITS = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>

#include "attn_pool_plan.h"

// argv: C H C H ...; prints one line per pair: C H HMAX fwd_threads bwd_threads fwd_bytes bwd_bytes
int main(int argc, char** argv) {
  namespace p = cvf::attn_pool_plan;
  for (int i = 1; i + 1 < argc; i += 2) {
    const int C = std::atoi(argv[i]), H = std::atoi(argv[i + 1]);
    std::printf("%d %d %d %d %d %zu %zu\n", C, H, p::head_pad(H), p::fwd_threads(C),
                p::bwd_threads(C), p::fwd_smem_bytes(C, H), p::bwd_smem_bytes(C, H));
  }
  return 0;
}
"""


def variant_shapes():
    """Every (C, H) a variant's cross-attention runs at: (embed_dim[i], num_heads[i])."""
    return sorted({(C, H) for args in MODEL_ARGS.values()
                   for C, H in zip(args["embed_dim"], args["num_heads"])})


def plan_table(shapes, tmp_path: Path):
    """{(C, H): dict of the plan} as the header computes it."""
    src = tmp_path / "plan.cpp"
    exe = tmp_path / "plan"
    src.write_text(PROGRAM)
    build = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(src),
                            "-o", str(exe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    assert build.returncode == 0, f"the plan header does not build as plain C++:\n{build.stdout}"
    args = [str(v) for shape in shapes for v in shape]
    out = subprocess.run([str(exe), *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    table = {}
    for line in out.splitlines():
        C, H, hmax, fwd_threads, bwd_threads, fwd, bwd = map(int, line.split())
        table[C, H] = dict(hmax=hmax, fwd_threads=fwd_threads, bwd_threads=bwd_threads,
                           fwd_bytes=fwd, bwd_bytes=bwd)
    assert sorted(table) == sorted(shapes)
    return table


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler (g++ / c++) on PATH")
    return plan_table(variant_shapes(), tmp_path_factory.mktemp("cuda_plan"))


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


def test_launch_shape_covers_the_width(plans):
    # One thread per column quad (forward) / pair (backward), whole warps; heads padded up.
    for (C, H), p in plans.items():
        assert p["hmax"] in (4, 8, 16) and p["hmax"] >= H
        assert p["fwd_threads"] % 32 == 0 and 4 * p["fwd_threads"] >= C
        assert p["bwd_threads"] % 32 == 0 and 2 * p["bwd_threads"] >= C
