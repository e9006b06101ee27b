"""Backend choice: set_backend, use_backend, the environment variable, per-call, and reasons."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import crossvit_fast
from crossvit_fast import BackendUnavailableError, backends, ops


@pytest.fixture(autouse=True)
def restore_backend():
    before = crossvit_fast.get_backend()
    yield
    crossvit_fast.set_backend(before)


def test_default_is_auto_and_auto_runs_torch_on_cpu():
    assert crossvit_fast.get_backend() in backends.BACKENDS
    assert backends.resolve("auto", "cpu") == "torch"


def test_set_and_use_backend_nest_and_restore():
    crossvit_fast.set_backend("torch")
    assert crossvit_fast.get_backend() == "torch"
    with crossvit_fast.use_backend("auto"):
        assert crossvit_fast.get_backend() == "auto"
        with crossvit_fast.use_backend("TORCH"):
            assert crossvit_fast.get_backend() == "torch"
        assert crossvit_fast.get_backend() == "auto"
    assert crossvit_fast.get_backend() == "torch"


def test_unknown_names_are_rejected_everywhere():
    with pytest.raises(ValueError, match="set_backend: unknown backend 'gpu'"):
        crossvit_fast.set_backend("gpu")
    with pytest.raises(ValueError, match="use_backend: unknown backend 'gpu'"):
        with crossvit_fast.use_backend("gpu"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine without CUDA")
def test_cuda_backend_unavailable_without_a_gpu_says_why():
    reason = backends.unavailable_reason("cuda", "cpu")
    assert reason and "CUDA" in reason
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
        crossvit_fast.set_backend("cuda")


def test_per_call_backend_overrides_the_global_choice(monkeypatch):
    calls = []
    impl = backends.implementation("torch")
    real = impl.layer_norm_fwd
    monkeypatch.setattr(impl, "layer_norm_fwd", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 8)
    ops.layer_norm(x, torch.ones(8), torch.zeros(8), backend="torch")
    assert calls == [1]


def test_environment_variable_sets_the_default():
    code = "import crossvit_fast; print(crossvit_fast.get_backend())"
    env = dict(os.environ, CROSSVIT_FAST_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "torch", out.stderr


def test_a_bad_environment_variable_is_reported_when_a_backend_is_first_chosen():
    """``import crossvit_fast`` works; the first op (or get_backend) raises a ValueError naming the
    variable, its value and the valid names; set_backend replaces it."""
    code = "\n".join([
        "import torch, crossvit_fast",
        "from crossvit_fast import ops",
        "x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)",
        "try:",
        "    ops.layer_norm(x, w, b)",
        "except ValueError as err:",
        "    print('ValueError:', err)",
        "crossvit_fast.set_backend('torch')",
        "print('then', crossvit_fast.get_backend(), tuple(ops.layer_norm(x, w, b).shape))",
    ])
    env = dict(os.environ, CROSSVIT_FAST_BACKEND="fastest")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "ValueError: CROSSVIT_FAST_BACKEND: unknown backend 'fastest'; expected one of auto, triton, cuda, torch",
        "then torch (2, 8)"]


def test_status_reports_every_backend():
    status = backends.status()
    assert set(status) == {"triton", "cuda", "torch"}
    assert status["torch"]["cpu"] is None


@pytest.fixture
def cuda_token_pass_limits(monkeypatch):
    """The cuda backend's token-pass limits as on a Turing GPU (64 KiB per block), without one:
    ``attn_pool_limits`` answers from the plan's bytes for crossvit_base's widths."""
    from types import SimpleNamespace

    from crossvit_fast.backends import cuda_backend
    bytes_at = {(96, 3): (8560, 4416), (768, 12): (94272, 40032)}

    def attn_pool_limits(C, H, device):
        fits = C <= 1024 and H <= 16
        return [1024, 16, *(bytes_at[C, H] if fits else (0, 0)), 65536]

    ops_namespace = SimpleNamespace(attn_pool_limits=attn_pool_limits)
    monkeypatch.setattr(cuda_backend, "_ops", lambda: ops_namespace)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    for cached in (cuda_backend.token_pass_unsupported, cuda_backend._warn_token_pass_on_torch):
        cached.cache_clear()
    yield cuda_backend
    for cached in (cuda_backend.token_pass_unsupported, cuda_backend._warn_token_pass_on_torch):
        cached.cache_clear()


def test_cuda_token_pass_limits_name_what_does_not_fit(cuda_token_pass_limits):
    unsupported = cuda_token_pass_limits.token_pass_unsupported
    assert unsupported(96, 3, 0) is None
    assert unsupported(768, 12, 0) == ("C = 768 with H = 12 heads needs 94272 bytes of shared memory "
                                       "per block and Tesla T4 allows 65536")
    assert unsupported(1040, 4, 0) == "the width C = 1040 is more than the 1024 they take"
    assert unsupported(96, 20, 0) == "H = 20 heads are more than the 16 they take"


def test_cuda_token_pass_beyond_the_limits_runs_torch_with_one_warning(cuda_token_pass_limits):
    on_torch = cuda_token_pass_limits._token_pass_on_torch
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not on_torch(torch.bfloat16, gpu, 96, 3)
        assert on_torch(torch.float64, gpu, 96, 3)          # the reference precision, silently
        assert not on_torch(torch.float32, torch.device("cpu"), 768, 12)   # the op names the device
    with pytest.warns(RuntimeWarning, match=r"cannot run this shape \(C = 768 with H = 12 heads needs "
                                            r"94272 bytes.*Tesla T4 allows 65536\); it runs on the torch"):
        assert on_torch(torch.float16, gpu, 768, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # once per shape
        assert on_torch(torch.float16, gpu, 768, 12)


def test_every_cuda_token_pass_op_asks_the_limits_and_follows_them(monkeypatch):
    """attn_pool_fwd, attn_pool_bwd and attn_weights each ask ``_token_pass_on_torch`` with the
    rows' width and the heads of ``kt``, and run the torch backend or the kernels as it says."""
    from types import SimpleNamespace

    from crossvit_fast.backends import cuda_backend, torch_backend
    asked, launched = [], []
    answer = {"on_torch": True}

    def on_torch(dtype, device, C, H):
        asked.append((C, H))
        return answer["on_torch"]

    def kernel(name):
        return lambda *args: launched.append(name)

    monkeypatch.setattr(cuda_backend, "_token_pass_on_torch", on_torch)
    fake_ops = SimpleNamespace(**{n: kernel(n) for n in ("attn_pool_fwd", "attn_pool_bwd", "attn_weights")})
    monkeypatch.setattr(cuda_backend, "_ops", lambda: fake_ops)
    B, N, C, H = 2, 5, 12, 3
    x0, patches, kt = torch.randn(B, C), torch.randn(B, N, C), torch.randn(B, H, C)
    gamma, beta, dz = torch.randn(C), torch.randn(C), torch.randn(B, H, C)
    z, lse = torch_backend.attn_pool_fwd(x0, patches, kt, gamma, beta, 1e-6)
    calls = {
        "attn_pool_fwd": (x0, patches, kt, gamma, beta, 1e-6),
        "attn_pool_bwd": (dz, x0, patches, kt, gamma, beta, z, lse, 1e-6),
        "attn_weights": (x0, patches, kt, gamma, beta, lse, 1e-6),
    }
    for name, args in calls.items():
        got, expected = getattr(cuda_backend, name)(*args), getattr(torch_backend, name)(*args)
        for g, e in zip(got if isinstance(got, tuple) else (got,),
                        expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(g, e)
    assert asked == [(C, H)] * 3 and launched == []
    answer["on_torch"] = False
    for name, args in calls.items():
        getattr(cuda_backend, name)(*args)
    assert launched == list(calls)
