"""torch.compile(fullgraph=True) traces the fused ops (custom ops with fake impls): no graph break."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossvit_fast
from crossvit_fast import backends, layers

from .conftest import DEVICE
from .numerics import FP32_PAIR_TOL, rel_err
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


@pytest.mark.skipif(backends.unavailable_reason("triton", "cpu") is not None,
                    reason="the Triton backend cannot run CPU tensors here")
def test_jit_trace_records_the_fused_ops_and_replays_on_new_inputs(fused_cls_projection):
    """torch.jit.trace records each Triton op as one custom-op call (its launches could not be
    recorded), so the trace replays correctly, with gradients, on other inputs."""
    model = small_model().eval()
    with crossvit_fast.use_backend("triton"):
        traced = torch.jit.trace(model, torch.randn(2, 3, 48, 48), check_trace=False)
    assert "crossvit_fast::attn_pool" in str(traced.inlined_graph)
    x = torch.randn(2, 3, 48, 48)
    assert rel_err(traced(x), model(x)) < FP32_PAIR_TOL
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
        assert rel_err(exported.module()(x), model(x)) < FP32_PAIR_TOL


def test_a_saved_export_loads_in_a_new_process_after_importing_the_ops(tmp_path):
    """README's recipe: the exported program calls crossvit_fast::attn_pool, which ``import
    crossvit_fast`` alone does not register (its names load on first use); ``import
    crossvit_fast.ops`` does, and the program loads and runs in a new process."""
    model = small_model().eval()
    x = torch.randn(2, 3, 48, 48)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "want.pt")
    code = (f"import torch, crossvit_fast.ops\nd = {str(tmp_path)!r}\n"
            "got = torch.export.load(d + '/model.pt2').module()(torch.load(d + '/x.pt'))\n"
            "print((got - torch.load(d + '/want.pt')).abs().max().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split()[-1]) < 1e-5


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
    assert rel_err(loaded(x), model(x)) < FP32_PAIR_TOL
    with pytest.raises(RuntimeError, match="dtype"):   # as timm's trace: no cast was recorded
        loaded(x.double())
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
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert len(recorder.graphs) == 1 and not breaks, (
        f"torch {torch.__version__} splits the {mode} model into {len(recorder.graphs)} graphs; "
        f"graph breaks: {breaks}")


def test_the_second_compiled_step_of_a_fresh_process_does_not_recompile():
    """In a fresh process the backend choice must already be made when dynamo first traces an
    op: a trace that made it (``get_backend`` seeding it from the environment) guarded on it
    being unset, and the whole model compiled again on the next step."""
    code = "\n".join([
        "import torch",
        "from tests.test_model import small_model",
        "graphs = []",
        "def count(gm, example_inputs):",
        "    graphs.append(gm)",
        "    return gm.forward",
        "compiled = torch.compile(small_model().train(), backend=count)",
        "for _ in range(2):",
        "    compiled(torch.randn(2, 3, 48, 48)).square().mean().backward()",
        "print(len(graphs))",
    ])
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != backends.ENV_VAR})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1", out.stdout


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


# ---- the Triton backend's kernels as the compiler sees them (triton_op + wrap_triton) --------

triton_here = pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                                 reason="the Triton backend cannot run here")


def _float64_leaves(*shapes, views=()):
    return [torch.randn(*s, dtype=torch.float64, device=DEVICE).requires_grad_() for s in shapes]


def _outputs_and_grads(op, args):
    """``op(*args)``'s tensor outputs and the gradients of its tensor inputs that require grad,
    for one fixed random weighting of the differentiable outputs."""
    outs = op(*args)
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.manual_seed(1)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs if o.requires_grad)
    return outs, torch.autograd.grad(loss, wrt, allow_unused=True)


def _triton_op_cases():
    B, N, C, H, M, Cout = 3, 5, 24, 2, 6, 40
    x0, patches, kt, gamma, beta, wk_bias = _float64_leaves((B, C), (B, N, C), (B, H, C), (C,), (C,), (C,))
    rows, residual, w, b = _float64_leaves((M, C), (M, C), (C,), (C,))
    weight, bias = _float64_leaves((Cout, C), (Cout,))
    long_patches, = _float64_leaves((B, 300, C))     # several token splits (B is small)
    ops_ = torch.ops.crossvit_fast
    return {
        "attn_pool": (ops_.attn_pool, ops_.attn_pool_triton,
                      [x0, patches, kt, gamma, beta, wk_bias, 1e-6, None]),
        "attn_pool_split": (ops_.attn_pool, ops_.attn_pool_triton,
                            [x0, long_patches, kt, gamma, beta, wk_bias, 1e-6, None]),
        "add_layer_norm": (ops_.layer_norm, ops_.layer_norm_triton,
                           [rows, residual, w, b, 1e-6, None]),
        "layer_norm": (ops_.layer_norm, ops_.layer_norm_triton, [rows, None, w, b, 1e-6, None]),
        "cls_proj": (ops_.cls_proj, ops_.cls_proj_triton, [rows, w, b, weight, bias, 1e-6]),
    }


@triton_here
@pytest.mark.parametrize("name", ["attn_pool", "add_layer_norm", "layer_norm", "cls_proj"])
def test_triton_ops_compute_what_the_custom_ops_compute(name):
    """The triton_op form of each op (what torch.compile decomposes into kernel launches), run
    eagerly, gives the PyTorch backend's outputs and gradients in float64, through its own
    registered backward op."""
    custom_op, triton_op, args = _triton_op_cases()[name]
    got, got_grads = _outputs_and_grads(triton_op, args + ["triton"])
    want, want_grads = _outputs_and_grads(custom_op, args + ["torch"])
    for g, w in zip(got, want):
        assert g.numel() == 0 or rel_err(g, w) < 1e-10
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None) and (g is None or rel_err(g, w) < 1e-10)
    torch.library.opcheck(triton_op, args + ["triton"],
                          test_utils=("test_schema", "test_autograd_registration"))


def _written_pointers(kernel) -> set:
    """The pointer arguments ``kernel`` may write: those named in the address of a ``tl.store``,
    directly or through a local variable assigned from them (``ptrs, mask = helper(out_ptr, ...)``).
    A superset of what Triton's TTIR says, read from the source."""
    import ast
    import inspect
    import textwrap
    fn = kernel
    while not inspect.isfunction(fn):      # JITFunction / InterpretedFunction wrappers
        fn = fn.fn
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    assigned = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            names = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        assigned.setdefault(t.id, set()).update(names)
    written = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "store"):
            for name in {n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)}:
                written |= {name} | assigned.get(name, set())
    return {name for name in written & set(kernel.arg_names) if name.endswith("_ptr")}


@triton_here
def test_the_written_pointers_are_read_from_the_kernel_source():
    from crossvit_fast.kernels import attn_pool
    assert _written_pointers(attn_pool._scores_kernel) == {"s_ptr", "mean_ptr", "rstd_ptr", "m_ptr", "l_ptr"}
    assert _written_pointers(attn_pool._token_bwd_kernel) == {
        "dx0_ptr", "dp_ptr", "a_ptr", "ds_ptr", "mean_ptr", "rstd_ptr"}


@pytest.fixture
def compilable_triton(monkeypatch):
    """The kernels as a GPU machine holds them (Triton's JITFunction, which the compiler can
    record, in place of the CPU interpreter's InterpretedFunction), and the backend saying so.
    Graphs can then be traced here; :func:`_run_as_traced` runs them. Yields the swaps made,
    ``(module, name, JITFunction, InterpretedFunction)``."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from crossvit_fast.backends import triton_backend
    from crossvit_fast.kernels import attn_pool, cls_proj, layer_norm
    swaps = []
    for module in (attn_pool, cls_proj, layer_norm):
        for name, fn in list(vars(module).items()):
            if isinstance(fn, InterpretedFunction):     # kernels and the helpers they call
                swaps.append((module, name, JITFunction(fn.fn), fn))
                monkeypatch.setattr(module, name, swaps[-1][2])
    monkeypatch.setattr(triton_backend, "recordable", lambda: True)
    # Functionalization asks which arguments each launch writes. On a GPU machine the compiler
    # reads it from the kernel's TTIR; here Triton cannot make TTIR (its interpreter replaces
    # triton.language) and the compiler would take every argument as written, a reading its
    # partitioner cannot follow through two backward kernels ("Node ... was invalid, but is
    # output"). The kernels' sources say which pointers they store through.
    from torch._higher_order_ops import triton_kernel_wrap

    def mutated_tensors(kernel_idx, constant_args_idx, kwargs, tma_descriptor_metadata):
        written = _written_pointers(triton_kernel_wrap.kernel_side_table.get_kernel(kernel_idx))
        return [name for name, value in kwargs.items()
                if name in written and isinstance(value, torch.Tensor)]
    monkeypatch.setattr(triton_kernel_wrap, "get_mutated_tensors", mutated_tensors)
    torch._dynamo.reset()
    yield swaps
    torch._dynamo.reset()


def _run_as_traced(swaps):
    """A torch.compile backend that runs AOTAutograd's forward and backward graphs as traced
    (functionalized kernel launches, no inductor), each launch made by the kernel that
    ``compilable_triton`` swapped out: Triton's interpreter runs them on the CPU."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    interpreted = {jit.fn.__name__: fn for _, _, jit, fn in swaps}

    def compiler(gm, example_inputs):
        for idx, kernel in list(kernel_side_table.id_to_kernel.items()):
            if getattr(kernel, "fn", None) is not None and kernel.fn.__name__ in interpreted:
                kernel_side_table.id_to_kernel[idx] = interpreted[kernel.fn.__name__]

        def run(*args):
            for module, name, _, fn in swaps:      # the helpers the kernels call, interpreted
                setattr(module, name, fn)
            try:
                return gm(*args)
            finally:
                for module, name, jit, _ in swaps:
                    setattr(module, name, jit)
        return make_boxed_func(run)
    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


class _Traced(Exception):
    """Raised instead of running a captured graph."""


def _joint_graph(fn, *args):
    """The forward+backward graph that AOTAutograd hands the compiler for ``fn(*args)``."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition
    captured = []

    def partition(joint, inputs, **kwargs):
        captured.append(joint)
        return default_partition(joint, inputs, **kwargs)

    def no_run(gm, example_inputs):
        def run(*a):
            raise _Traced
        return run
    backend = aot_autograd(fw_compiler=no_run, bw_compiler=no_run, partition_fn=partition)
    with pytest.raises(_Traced):
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return captured[0].graph


def _kernels_and_ops(graph):
    """The Triton kernels launched in ``graph`` (by name) and its ``crossvit_fast::`` op calls."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    kernels, ops_ = set(), set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernels.add(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
        elif "crossvit_fast" in str(node.target):
            ops_.add(str(node.target))
    return kernels, ops_


@triton_here
@pytest.mark.filterwarnings("ignore")
def test_compiled_training_step_launches_the_triton_kernels(compilable_triton, fused_cls_projection):
    """Under torch.compile the Triton backend's token pass (and the CLS projection where it is
    fused) are kernel launches in the graph the compiler optimizes, forward and backward, with
    no opaque crossvit_fast op left: inductor launches them from its own generated code."""
    model = small_model().train()
    with crossvit_fast.use_backend("triton"):
        kernels, custom_ops = _kernels_and_ops(
            _joint_graph(lambda x: model(x).square().mean(), torch.randn(2, 3, 48, 48)))
    assert not custom_ops, custom_ops
    expected = {"_scores_kernel", "_pool_fwd_kernel", "_token_bwd_kernel", "_pool_bwd_kernel"}
    if fused_cls_projection:
        expected |= {"_cls_proj_fwd_kernel", "_cls_proj_bwd_kernel"}
    assert kernels == expected


@triton_here
@pytest.mark.filterwarnings("ignore")
def test_compiled_layer_norm_launches_the_triton_kernels(compilable_triton):
    x, residual = torch.randn(6, 24, requires_grad=True), torch.randn(6, 24, requires_grad=True)
    w, b = torch.ones(24, requires_grad=True), torch.zeros(24, requires_grad=True)

    def step(x, residual):
        y, h = crossvit_fast.ops.add_layer_norm(x, residual, w, b, backend="triton")
        return (y * h).sum()
    kernels, custom_ops = _kernels_and_ops(_joint_graph(step, x, residual))
    assert not custom_ops, custom_ops
    assert kernels == {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"}


@triton_here
@pytest.mark.filterwarnings("ignore")
def test_compiled_training_step_with_the_kernel_launches_computes_eagers_gradients(
        compilable_triton, fused_cls_projection):
    """The graphs that hold the kernel launches, run (float64), give eager's outputs and
    gradients: what the compiler records of each triton_op body is right under
    functionalization (e.g. no tensor passed to a kernel twice, which it would take as two
    outputs)."""
    model = small_model().train().double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, device=DEVICE)
    model.to(DEVICE)

    def step(run):
        model.zero_grad()
        out = run(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    with crossvit_fast.use_backend("torch"):
        want, want_grads = step(model)
    with crossvit_fast.use_backend("triton"):
        got, got_grads = step(torch.compile(model, fullgraph=True,
                                            backend=_run_as_traced(compilable_triton)))
    assert rel_err(got, want) < 1e-10
    for name, g in want_grads.items():
        assert rel_err(got_grads[name], g) < 1e-10, name


@triton_here
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", ["attn_pool", "attn_pool_split", "add_layer_norm", "layer_norm",
                                  "cls_proj"])
def test_compiled_triton_ops_compute_what_the_custom_ops_compute(compilable_triton, name, dynamic,
                                                                 monkeypatch):
    """Each triton_op compiled (its kernel launches recorded, then run) gives the PyTorch
    backend's outputs and gradients; ``attn_pool_split``: tokens split across programs and
    combined (a second kernel). With dynamic shapes every size is symbolic while the body runs,
    widths and heads included (as in opcheck's test_aot_dispatch_dynamic)."""
    custom_op, triton_op, args = _triton_op_cases()[name]
    if name == "attn_pool_split":     # planned as on a GPU: the interpreter's plan splits nothing
        from crossvit_fast.kernels import attn_pool
        monkeypatch.setattr(attn_pool, "GPU_PLAN_ON_CPU", True)
    want, want_grads = _outputs_and_grads(custom_op, args + ["torch"])
    compiled = torch.compile(lambda *a: triton_op(*a), fullgraph=True, dynamic=dynamic,
                             backend=_run_as_traced(compilable_triton))
    got, got_grads = _outputs_and_grads(compiled, args + ["triton"])
    for g, w in zip(got, want):
        assert g.numel() == 0 or rel_err(g, w) < 1e-10
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None) and (g is None or rel_err(g, w) < 1e-10)


# ---- on a GPU: inductor's own code launches the kernels; CUDA-graph trees capture them ---------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inductor_launches_the_triton_kernels_itself(mode, caplog):
    """inductor's generated code holds the token-pass kernels (no crossvit_fast op call), the
    compiler could read which tensors each kernel writes (else it clones every input of every
    launch), and the compiled model matches eager."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    model = small_model().cuda().train(mode == "train")
    x = torch.randn(8, 3, 48, 48, device="cuda")

    def step(m):
        out = m(x)
        if mode == "train":
            out.square().mean().backward()
            return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return out.detach(), {}

    with crossvit_fast.use_backend("triton"), caplog.at_level("WARNING"):
        (got, got_grads), codes = run_and_get_code(step, torch.compile(model, fullgraph=True))
        model.zero_grad()
        want, want_grads = step(model)
    code = "\n".join(codes)
    assert "_scores_kernel" in code and "_pool_fwd_kernel" in code
    assert ("_token_bwd_kernel" in code) == ("_pool_bwd_kernel" in code) == (mode == "train")
    assert "torch.ops.crossvit_fast" not in code      # no opaque op call left
    assert "assuming every input is mutated" not in caplog.text
    assert rel_err(got, want) < 1e-4
    for name, g in want_grads.items():
        assert rel_err(got_grads[name], g) < 1e-4, name


@gpu
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reduce_overhead_captures_cuda_graphs(mode):
    """mode="reduce-overhead" replays CUDA graphs of the whole compiled model (none skipped)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = small_model().cuda().train(mode == "train")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(8, 3, 48, 48, device="cuda")
    with crossvit_fast.use_backend("triton"), torch.set_grad_enabled(mode == "train"):
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x)
            if mode == "train":
                out.square().mean().backward()
        want = model(x)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    assert rel_err(out.detach(), want.detach()) < 1e-4


@gpu
@pytest.mark.parametrize("name", ["attn_pool", "add_layer_norm", "layer_norm", "cls_proj"])
def test_triton_ops_pass_every_opcheck(name):
    """On a GPU the triton_op forms pass every opcheck, the fake-tensor and AOT ones included
    (their fake is their body, whose launches are recorded, not run)."""
    _, triton_op, args = _triton_op_cases()[name]
    torch.library.opcheck(triton_op, args + ["triton"])


@triton_here
def test_export_keeps_the_backend_neutral_op_on_the_triton_backend(compilable_triton):
    """torch.export records op calls: the exported program calls crossvit_fast::attn_pool,
    which runs on any backend, not the Triton-only triton_op the compiler decomposes."""
    model = small_model().eval()
    with crossvit_fast.use_backend("triton"):
        graph = torch.export.export(model, (torch.randn(2, 3, 48, 48),)).graph
    targets = {str(n.target) for n in graph.nodes if "crossvit_fast" in str(n.target)}
    assert targets == {"crossvit_fast.attn_pool.default"}, targets
