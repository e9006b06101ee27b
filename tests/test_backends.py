"""Backend choice: set_backend, use_backend, the environment variable, per-call, and reasons."""
import os
import subprocess
import sys

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
