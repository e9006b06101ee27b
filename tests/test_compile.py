"""torch.compile(fullgraph=True) traces the fused ops (custom ops with fake impls): no graph break."""
import pytest
import torch

import crossvit_fast
from crossvit_fast import backends, layers

from .conftest import DEVICE
from .numerics import rel_err
from .test_model import small_model


def test_fullgraph_training_step_matches_eager():
    torch.manual_seed(0)
    model = small_model().train()
    x = torch.randn(2, 3, 48, 48)
    model(x).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # traces fwd and bwd graphs
    compiled(x).square().mean().backward()
    for name, g in eager.items():
        assert rel_err(model.get_parameter(name).grad, g) < 1e-5, name


def test_fullgraph_inductor_inference_matches_eager():
    torch.manual_seed(0)
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert rel_err(torch.compile(model, fullgraph=True)(x), model(x)) < 1e-5


def test_fullgraph_under_bf16_autocast_matches_eager(fused_cls_projection):
    # Under autocast the ops read the autocast state (the norms' output dtype, the token pass's
    # dot dtype): that must trace without a graph break, forward and backward.
    torch.manual_seed(0)
    model = small_model().train()
    x = torch.randn(2, 3, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        eager.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        compiled.float().square().mean().backward()
    assert compiled.dtype == eager.dtype == torch.bfloat16
    assert rel_err(compiled, eager) < 1e-2
    for name, g in grads.items():
        assert rel_err(model.get_parameter(name).grad, g) < 5e-2, name


def _custom_ops_traced(model, x):
    """The ``crossvit_fast::`` ops in the graph that torch.compile captures of ``model(x)``."""
    found = set()

    def record(gm, example_inputs):
        found.update(str(n.target) for n in gm.graph.nodes
                     if n.op == "call_function" and "crossvit_fast" in str(n.target))
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=record)(x)
    return found


def test_compiled_model_leaves_block_norms_to_inductor(fused_cls_projection):
    """Under torch.compile the block norms are ATen's (inductor fuses them with the residual
    add), while the cross-attention stays the fused op."""
    model = small_model().eval()
    traced = _custom_ops_traced(model, torch.randn(2, 3, 48, 48))
    assert not any("layer_norm" in t for t in traced), traced
    assert any("attn_pool" in t for t in traced), traced
    assert any("cls_proj" in t for t in traced) == fused_cls_projection, traced


@pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                    reason="the Triton backend cannot run here")
def test_jit_trace_records_the_fused_ops_and_replays_on_new_inputs(fused_cls_projection):
    """torch.jit.trace records each Triton op as one custom-op call (its launches could not be
    recorded), so the trace replays correctly, with gradients, on other inputs."""
    model = small_model().eval()
    with crossvit_fast.use_backend("triton"):
        traced = torch.jit.trace(model, torch.randn(2, 3, 48, 48), check_trace=False)
    assert "crossvit_fast::attn_pool" in str(traced.inlined_graph)
    x = torch.randn(2, 3, 48, 48)
    assert rel_err(traced(x), model(x)) < 1e-6
    traced(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert rel_err(got[name], p.grad) < 1e-5, name


def test_torch_export_matches_eager():
    model = small_model().eval()
    exported = torch.export.export(model, (torch.randn(2, 3, 48, 48),))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert rel_err(exported.module()(x), model(x)) < 1e-6


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_on_the_torch_backend_is_aten_only_and_saves(grad, tmp_path):
    """On the PyTorch backend the trace (with torch.jit.trace's own consistency check) holds
    ATen ops alone, with or without gradients, so that it saves and loads where crossvit_fast
    is not installed (libtorch, ONNX export), and its gradients are the model's."""
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    with crossvit_fast.use_backend("torch"), torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, torch.randn(2, 3, 48, 48))
    assert "crossvit_fast::" not in str(traced.inlined_graph)
    torch.jit.save(traced, tmp_path / "model.pt")
    loaded = torch.jit.load(tmp_path / "model.pt")
    assert rel_err(loaded(x), model(x)) < 1e-6
    params = dict(model.named_parameters())
    loss = lambda out: out.square().sum()  # noqa: E731
    got = torch.autograd.grad(loss(traced(x)), list(params.values()), allow_unused=True)
    want = torch.autograd.grad(loss(model(x)), list(params.values()))
    for name, g, w in zip(params, got, want):
        if g is None:   # wk's bias cancels in the softmax: the ATen trace never reads it
            assert name.endswith("attn.wk.bias") and torch.count_nonzero(w) == 0, name
        else:
            assert rel_err(g, w) < 1e-5, name


@pytest.mark.parametrize("module", ["model", "cross_attention_block", "block_in_sequential"])
def test_jit_script_says_what_works_instead(module):
    m = {"model": small_model,
         "cross_attention_block": lambda: layers.CrossAttentionBlock(16, 2),
         "block_in_sequential": lambda: torch.nn.Sequential(layers.Block(16, 2))}[module]()
    with pytest.raises(NotImplementedError, match="torch.jit.trace.*torch.export"):
        torch.jit.script(m)


class _GraphRecorder:
    """A torch.compile backend that keeps every graph dynamo hands it and runs it as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _train_step(model, x):
    model(x).float().square().mean().backward()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_one_graph_without_breaks(mode):
    """The whole model is one graph, training (forward and backward) and inference, with no
    graph break: on torch 2.11 a call dynamo could not trace (torch.amp.is_autocast_available)
    split crossvit_18_240's forward into 24 graphs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = small_model().train(mode == "train")
    recorder = _GraphRecorder()
    compiled = torch.compile(model, backend=recorder)   # not fullgraph: a break shows as a count
    x = torch.randn(2, 3, 48, 48)
    for _ in range(2):
        if mode == "train":
            _train_step(compiled, x)
        else:
            with torch.no_grad():
                compiled(x)
    assert len(recorder.graphs) == 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_no_recompiles_across_steps_modes_and_autocast():
    """Each of train/eval × autocast off/on compiles once; going back and forth between them, and
    more steps in each, compile nothing new. A new batch size compiles one dynamic-shape graph
    that then serves every other batch size."""
    torch._dynamo.reset()
    model = small_model()
    recorder = _GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    x = torch.randn(2, 3, 48, 48)

    def run(training: bool, autocast: bool, batch: torch.Tensor = x):
        compiled.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if training:
                _train_step(compiled, batch)
            else:
                with torch.no_grad():
                    compiled(batch)

    settings = [(t, a) for a in (False, True) for t in (True, False)]
    for training, autocast in settings * 2:
        run(training, autocast)
    assert len(recorder.graphs) == len(settings)
    for batch in (3, 4, 5):
        run(True, False, torch.randn(batch, 3, 48, 48))
    assert len(recorder.graphs) == len(settings) + 1
