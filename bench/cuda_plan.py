"""The CUDA backend's shared-memory plan at every variant's cross-attention shape, without a GPU.

``csrc/attn_pool_plan.h`` holds the formulas attn_pool.cu launches with (tiles, block sizes, head
padding, bytes of dynamic shared memory). A tiny host program including it, built with the host
C++ compiler (no CUDA needed), prints the forward's and backward's bytes for each ``(C, H)``: the
very numbers the launch plan computes. bench.kernel_resources puts them beside the Triton
kernels' table; tests/test_cuda_plan.py checks them against every GPU's limit.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

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


def host_compiler() -> str:
    """The host C++ compiler, or '' where there is none."""
    return shutil.which("g++") or shutil.which("c++") or ""


def variant_shapes() -> List[Tuple[int, int]]:
    """Every (C, H) a variant's cross-attention runs at: (embed_dim[i], num_heads[i])."""
    from crossvit_fast.variants import MODEL_ARGS
    return sorted({(C, H) for args in MODEL_ARGS.values()
                   for C, H in zip(args["embed_dim"], args["num_heads"])})


def plan_table(shapes: List[Tuple[int, int]]) -> Dict[Tuple[int, int], dict]:
    """``{(C, H): {hmax, fwd_threads, bwd_threads, fwd_bytes, bwd_bytes}}`` as the header
    computes them. Raises RuntimeError where the header does not build as plain C++."""
    from crossvit_fast import _extension
    csrc = _extension.sources()[0].parent
    cxx = host_compiler()
    if not cxx:
        raise RuntimeError("no host C++ compiler (g++ / c++) on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "plan.cpp", Path(tmp) / "plan"
        src.write_text(PROGRAM)
        build = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{csrc}", str(src),
                                "-o", str(exe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        if build.returncode:
            raise RuntimeError(f"the plan header does not build as plain C++:\n{build.stdout}")
        args = [str(v) for shape in shapes for v in shape]
        out = subprocess.run([str(exe), *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    table = {}
    for line in out.splitlines():
        C, H, hmax, fwd_threads, bwd_threads, fwd, bwd = map(int, line.split())
        table[C, H] = dict(hmax=hmax, fwd_threads=fwd_threads, bwd_threads=bwd_threads,
                           fwd_bytes=fwd, bwd_bytes=bwd)
    return table
