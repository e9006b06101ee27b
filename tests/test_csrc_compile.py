"""The CUDA C++ sources compile, without a GPU; and, on a GPU, the built extension runs.

Each ``csrc/*.cu`` is compiled by nvcc for sm_75, sm_80 and sm_90 (one call per file, every arch;
sm_75, Turing, is the oldest nvcc 13 builds for and where ``auto`` runs this backend), and
``csrc/bindings.cpp`` is syntax-checked by the host compiler against the installed torch headers
with torch's own C++ standard and ABI flags. Skipped only when nvcc is not on PATH.

CPU wheels of torch ship ``c10/cuda/*`` but not the one header CMake generates for it,
``c10/cuda/impl/cuda_cmake_macros.h`` (a single ``#define C10_CUDA_BUILD_SHARED_LIBS`` in CUDA
builds); when it is missing, the check supplies that one-line header and nothing else.
"""
import re
import shutil
import subprocess
import tempfile
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from crossvit_fast import _extension
from crossvit_fast.backends import torch_backend

NVCC = shutil.which("nvcc")
CSRC = _extension.sources()[0].parent
ARCHS = ("75", "80", "90")
CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def run(cmd):
    """``None`` if ``cmd`` succeeds, else its command line and output."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return None if proc.returncode == 0 else f"$ {' '.join(map(str, cmd))}\n{proc.stdout}"


def cuda_include_dirs(tmp: Path):
    """The CUDA toolkit's include dirs, as nvcc itself reports them (``--dryrun``)."""
    empty = tmp / "empty.cu"
    empty.write_text("")
    proc = subprocess.run([NVCC, "--dryrun", "-c", str(empty), "-o", str(tmp / "empty.o")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("#$ INCLUDES=")), "")
    dirs = re.findall(r'-I"?([^" ]+)', line)
    assert dirs, f"could not find the CUDA include dir in nvcc --dryrun's output:\n{proc.stdout}"
    return dirs


def nvcc_cmd(source: Path, tmp: Path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return [NVCC, "-c", "-std=c++17", "-O3", *gencode, str(source), "-o", str(tmp / f"{source.stem}.o")]


def bindings_cmd(tmp: Path):
    includes = list(cpp_extension.include_paths()) + cuda_include_dirs(tmp) + [str(CSRC)]
    if not any((Path(d) / CMAKE_MACROS).exists() for d in cpp_extension.include_paths()):
        shim = tmp / "shim"
        (shim / CMAKE_MACROS).parent.mkdir(parents=True)
        (shim / CMAKE_MACROS).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(shim))
    cxx = shutil.which("c++") or shutil.which("g++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, "-fsyntax-only", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *[f"-I{d}" for d in includes], str(CSRC / "bindings.cpp")]


@needs_nvcc
def test_csrc_compiles_for_sm75_sm80_and_sm90():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmds = [bindings_cmd(tmp)] + [nvcc_cmd(s, tmp) for s in sorted(CSRC.glob("*.cu"))]
        with ThreadPool(2) as pool:
            failures = [f for f in pool.map(run, cmds) if f]
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_extension_builds_and_matches_the_torch_backend():
    # test_primitives covers every op but skips the cuda backend if the build fails; this fails.
    reason = _extension.load_extension()
    assert reason is None, reason
    from crossvit_fast.backends import cuda_backend

    x, res = torch.randn(2, 37, 200, device="cuda").unbind(0)
    w, b = torch.randn(2, 200, device="cuda").unbind(0)
    got = cuda_backend.layer_norm_fwd(x, res, w, b, 1e-6)
    expected = torch_backend.layer_norm_fwd(x, res, w, b, 1e-6)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_token_pass_beyond_the_kernels_limits_runs_the_torch_backend():
    reason = _extension.load_extension()
    assert reason is None, reason
    from bench.cuda_plan import variant_shapes
    from crossvit_fast.backends import cuda_backend

    device = torch.cuda.current_device()
    if torch.cuda.get_device_capability(device) >= (8, 0):   # every variant fits from the A100 on
        assert [s for s in variant_shapes() if cuda_backend.token_pass_unsupported(*s, device)] == []
    cuda_backend._warn_token_pass_on_torch.cache_clear()
    B, N, C, H = 2, 5, 1040, 4   # wider than the 1024 columns the kernels take
    x0, (gamma, beta) = torch.randn(B, C, device="cuda"), torch.randn(2, C, device="cuda")
    patches, kt = torch.randn(B, N, C, device="cuda"), torch.randn(B, H, C, device="cuda")
    with pytest.warns(RuntimeWarning, match="the width C = 1040 is more than the 1024"):
        cuda_backend.attn_pool_fwd(x0, patches, kt, gamma, beta, 1e-6)
    z, lse = torch_backend.attn_pool_fwd(x0, patches, kt, gamma, beta, 1e-6)
    dz = torch.randn_like(z)
    for name, args in (("attn_pool_fwd", (x0, patches, kt, gamma, beta, 1e-6)),   # warned above
                       ("attn_pool_bwd", (dz, x0, patches, kt, gamma, beta, z, lse, 1e-6)),
                       ("attn_weights", (x0, patches, kt, gamma, beta, lse, 1e-6))):
        got, expected = getattr(cuda_backend, name)(*args), getattr(torch_backend, name)(*args)
        for g, e in zip(got if isinstance(got, tuple) else (got,),
                        expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(g, e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_row_wider_than_shared_memory_is_refused_by_name():
    """The LayerNorm and CLS-projection kernels hold whole rows in shared memory (one a warp
    forward, four backward): a width past what the GPU grants a block is refused with the bytes
    it needs, not a bare launch error."""
    reason = _extension.load_extension()
    assert reason is None, reason
    from crossvit_fast.backends import cuda_backend

    refused = r"a width C = {} needs \d+ bytes of shared memory per block; this GPU allows \d+\. Use the triton"
    C = 1 << 16   # 256 KiB a fp32 row: more than any GPU grants a block (227 KiB on an H100)
    x = torch.randn(2, C, device="cuda")
    w, b = torch.randn(2, C, device="cuda").unbind(0)
    with pytest.raises(RuntimeError, match=refused.format(C)):
        cuda_backend.layer_norm_fwd(x, None, w, b, 1e-6)
    with pytest.raises(RuntimeError, match=refused.format(C)):
        cuda_backend.cls_proj_fwd(x, w, b, torch.randn(4, C, device="cuda"), torch.randn(4, device="cuda"), 1e-6)
    C = 1 << 14   # a 64 KiB row runs forward (from the A100 on); its backward's four rows do not
    x = torch.randn(2, C, device="cuda")
    w, b = torch.randn(2, C, device="cuda").unbind(0)
    y, h, mean, rstd = cuda_backend.layer_norm_fwd(x, None, w, b, 1e-6)
    torch.testing.assert_close(y, torch_backend.layer_norm_fwd(x, None, w, b, 1e-6)[0])
    with pytest.raises(RuntimeError, match=refused.format(C)):
        cuda_backend.layer_norm_bwd(torch.randn_like(y), None, h, w, mean, rstd)

