"""The whole model on each kernel backend against the same model on the PyTorch backend.

Same weights, same input: the logits and every parameter gradient must agree to fp32 rounding
(the backends differ only in summation order). The patch tokens of both branches, the CLS
projections, the cross-attention and every LayerNorm go through the backend's kernels.
"""
import pytest
import torch

from crossvit_fast import use_backend

from .conftest import DEVICE, backend_param
from .numerics import rel_err
from .test_model import small_model

KERNEL_BACKENDS = [backend_param("triton"), backend_param("cuda")]
# fp32 with reassociated sums; the gradients pass through ~10 layers, so allow a little growth.
FP32_TOL = 2e-5


def logits_and_grads(model, images, backend):
    model.zero_grad(set_to_none=True)
    with use_backend(backend):
        logits = model(images)
        logits.square().mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_model_on_backend_matches_the_torch_backend(backend, fused_cls_projection):
    model = small_model(num_classes=7).to(DEVICE)
    images = torch.randn(2, 3, 48, 48, device=DEVICE)
    want_logits, want_grads = logits_and_grads(model, images, "torch")
    got_logits, got_grads = logits_and_grads(model, images, backend)
    assert rel_err(got_logits, want_logits) < FP32_TOL, "logits"
    assert got_grads.keys() == want_grads.keys()
    worst = max(want_grads, key=lambda k: rel_err(got_grads[k], want_grads[k]))
    assert rel_err(got_grads[worst], want_grads[worst]) < FP32_TOL, worst
