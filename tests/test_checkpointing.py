"""Activation checkpointing (``model.set_grad_checkpointing()``): each ViT block is recomputed in
the backward through the fused ops, with the plain run's gradients, in eager mode and under
``torch.compile``, and a training step needs less memory."""
import pytest
import torch
import torch.nn.functional as F

from crossvit_fast import layers, ops, use_backend
from crossvit_fast.benchmarking import peak_memory
from crossvit_fast.reference import naive_math

from .conftest import DEVICE, backend_param
from .numerics import FP32_REL_TOL, rel_err
from .test_model import small_model

# Recomputing a block repeats its forward bit for bit (same ops, same inputs, same random
# draws), so the gradients differ from the plain run's only where autograd sums them in
# another order: fp32 rounding, and much less in float64.
TOL = {torch.float32: FP32_REL_TOL, torch.float64: 1e-12}
# Dropout and stochastic depth draw random numbers: the recompute must replay them.
DROPOUT = dict(drop_path_rate=0.2, proj_drop_rate=0.1, drop_rate=0.1)


def train_step(model, images, labels, forward=None, seed=1):
    """Loss and every parameter's gradient of one seeded training step of ``model``, run by
    ``forward`` (the model itself by default; a compiled one)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = F.cross_entropy((model if forward is None else forward)(images), labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(got, want, tol):
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert rel_err(got_loss, want_loss) <= tol, "loss"
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) <= tol, name


def model_and_batch(dtype=torch.float32, **kwargs):
    model = small_model(num_classes=5, **kwargs).to(DEVICE, dtype).train()
    return (model, torch.randn(3, 3, 48, 48, dtype=dtype, device=DEVICE),
            torch.tensor([0, 3, 4], device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", [backend_param("torch"), backend_param("triton")])
def test_checkpointed_gradients_equal_the_plain_run(backend, dtype, fused_cls_projection):
    model, images, labels = model_and_batch(dtype, **DROPOUT)
    with use_backend(backend):
        plain = train_step(model, images, labels)
        model.set_grad_checkpointing(True)
        checkpointed = train_step(model, images, labels)
    assert_same_step(checkpointed, plain, TOL[dtype])


def test_checkpointed_gradients_under_bf16_autocast():
    """The forward under autocast, the backward outside it (as usual): the recompute replays
    the forward's autocast state, so the same bf16 products and the plain run's gradients to
    fp32 rounding, not bf16's."""
    model, images, labels = model_and_batch(**DROPOUT)

    def forward(x):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return model(x)
    plain = train_step(model, images, labels, forward)
    model.set_grad_checkpointing(True)
    assert_same_step(train_step(model, images, labels, forward), plain, FP32_REL_TOL)


def test_backward_recomputes_each_block_through_the_fused_norm(monkeypatch):
    """Each branch block runs its two norms again in the backward (the fused add + LayerNorm op:
    the conftest fuses every norm); the CLS exchange is not recomputed."""
    calls = {"n": 0}
    fused = ops.add_layer_norm

    def counting(*args, **kwargs):
        calls["n"] += 1
        return fused(*args, **kwargs)
    monkeypatch.setattr(ops, "add_layer_norm", counting)
    model, images, labels = model_and_batch()
    num_blocks = sum(len(chain) for stage in model.blocks for chain in stage.blocks)
    for enable, recomputed in ((False, 0), (True, 2 * num_blocks)):
        model.set_grad_checkpointing(enable)
        loss = F.cross_entropy(model(images), labels)
        calls["n"] = 0
        loss.backward()
        assert calls["n"] == recomputed


def test_recompute_makes_the_forwards_choices_outside_its_context(monkeypatch):
    """A backward outside the block that chose the math (here timm's naive math, and a patched
    norm threshold) recomputes with the forward's choices: the same gradients, no
    CheckpointError for a different graph."""
    model, images, labels = model_and_batch()

    def step():
        model.zero_grad(set_to_none=True)
        with naive_math():
            loss = F.cross_entropy(model(images), labels)
        monkeypatch.setattr(layers, "FUSED_NORM_MIN_ELEMENTS", 1 << 30)
        loss.backward()
        monkeypatch.setattr(layers, "FUSED_NORM_MIN_ELEMENTS", 0)
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}
    plain = step()
    model.set_grad_checkpointing(True)
    assert_same_step(step(), plain, FP32_REL_TOL)
    assert layers.FUSED_NORM_MIN_ELEMENTS == 0


def test_second_backward_with_retained_graph_recomputes_again():
    """``backward(retain_graph=True)`` then ``backward()``: the checkpoint recomputes each block
    again in the second backward (entering the forward's choices again), and the gradients
    accumulate to twice the plain run's."""
    model, images, labels = model_and_batch(**DROPOUT)
    want_loss, want_grads = train_step(model, images, labels)
    model.set_grad_checkpointing(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = F.cross_entropy(model(images), labels)
    loss.backward(retain_graph=True)
    loss.backward()
    assert_same_step((loss.detach(), {name: p.grad / 2 for name, p in model.named_parameters()}),
                     (want_loss, want_grads), FP32_REL_TOL)


def checkpoint_regions_traced(model, images):
    """How many checkpointed regions torch.compile captures in ``model(images)``."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=record)(images)
    return targets.count("tag_activation_checkpoint")


def test_checkpointed_gradients_under_torch_compile():
    """The compiled graph holds one checkpointed region per branch block, and the compiled
    step (aot_eager: AOTAutograd's forward and backward graphs, run by eager kernels) gives the
    plain eager step's gradients."""
    model, images, labels = model_and_batch(**DROPOUT)
    plain = train_step(model, images, labels)
    model.set_grad_checkpointing(True)
    num_blocks = sum(len(chain) for stage in model.blocks for chain in stage.blocks)
    assert checkpoint_regions_traced(model, images) == num_blocks
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_step(train_step(model, images, labels, compiled), plain, FP32_REL_TOL)


def test_set_grad_checkpointing_sets_timms_attribute_and_leaves_inference_alone():
    model, images, _ = model_and_batch()
    assert not model.grad_checkpointing
    model.set_grad_checkpointing()
    assert model.grad_checkpointing and all(stage.grad_checkpointing for stage in model.blocks)
    model.eval()
    with torch.no_grad():
        checkpointed = model(images)
    model.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in model.blocks)
    with torch.no_grad():
        assert torch.equal(checkpointed, model(images))


def test_checkpointing_lowers_the_peak_memory_of_a_training_step():
    """At least a third less at this size (measured: 300 against 610 kB above the step's start;
    the gradients accumulate into tensors that exist already). README has full-size numbers."""
    model, images, labels = model_and_batch()
    step = lambda: F.cross_entropy(model(images), labels).backward()  # noqa: E731
    step()
    plain = peak_memory(step, DEVICE)
    model.set_grad_checkpointing(True)
    step()
    assert peak_memory(step, DEVICE) < 2 / 3 * plain
