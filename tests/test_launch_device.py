"""Eager Triton launches run on their tensors' GPU, whichever CUDA device is current.

Triton launches on the current CUDA device (with that device's current stream); a model on
cuda:1 called while cuda:0 is current would otherwise launch on GPU 0 with pointers into GPU 1's
memory. The CUDA extension guards its launches in C++ (``c10::DeviceGuard``); the Triton
backend's primitives and the fused CLS exchange enter ``kernels._launch.on_device_of``.
"""
import contextlib
import sys
import types

import pytest
import torch

from crossvit_fast import layers, use_backend
from crossvit_fast.backends import triton_backend
from crossvit_fast.kernels import _launch

from .conftest import DEVICE, backend_param
from .test_model import small_model


def _fake_tensor_on(device: str):
    return types.SimpleNamespace(device=torch.device(device))


def test_on_device_of_switches_only_to_another_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    other = _launch.on_device_of(_fake_tensor_on("cuda:1"))
    assert isinstance(other, torch.cuda.device) and other.idx == 1
    assert isinstance(_launch.on_device_of(_fake_tensor_on("cuda:0")), contextlib.nullcontext)
    assert isinstance(_launch.on_device_of(_fake_tensor_on("cpu")), contextlib.nullcontext)


# The functions that launch Triton kernels eagerly: the Triton backend's primitives and the fused
# CLS exchange.
LAUNCHERS = {"attn_pool_fwd", "attn_pool_bwd", "layer_norm_fwd", "layer_norm_bwd", "cls_proj_fwd",
             "cls_proj_bwd", "attn_weights", "exchange"}


@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_every_eager_launcher_enters_the_device_guard(backend, monkeypatch):
    """A forward and backward with every fused op (the CLS projections fused, the block norms
    fused), a forward recording attention maps and one with the fused CLS exchange: each
    launching function asks for its tensors' device first."""
    callers = set()

    def recording_guard(t):
        frame = sys._getframe(1)
        while frame is not None:
            callers.add(frame.f_code.co_name)
            frame = frame.f_back
        return contextlib.nullcontext()
    monkeypatch.setattr(triton_backend, "on_device_of", recording_guard)
    monkeypatch.setattr(_launch, "on_device_of", recording_guard)
    monkeypatch.setattr(layers, "FUSED_CLS_PROJECTION", True)
    model = small_model().to(DEVICE).eval()
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    with use_backend("triton"):
        model(x).sum().backward()
        with torch.no_grad():
            model.forward_attention_maps(x)
            monkeypatch.setattr(layers, "FUSED_CLS_EXCHANGE", True)
            model(x)
    assert LAUNCHERS <= callers, f"never guarded: {sorted(LAUNCHERS - callers)}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_a_model_on_the_second_gpu_runs_while_the_first_is_current(backend, monkeypatch):
    monkeypatch.setattr(layers, "FUSED_CLS_EXCHANGE", True)
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
    torch.cuda.set_device(0)
    model = model.to("cuda:1")
    with use_backend("triton"):
        got = model(x.to("cuda:1"))                 # with gradients: the ops' forward, then backward
        got.sum().backward()
        with torch.no_grad():
            inference = model(x.to("cuda:1"))       # the fused CLS exchange
    for out in (got.detach(), inference):
        assert out.device == torch.device("cuda:1")
        assert torch.allclose(out.cpu(), expected, atol=1e-4)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device == torch.device("cuda:1") for g in grads)
