"""Property-based tests: random inputs at each fused op and at the model.

Hypothesis draws shapes (batch 0 and no patch tokens included), dtypes, layouts (strided views,
transposed storage, channels-last), NaN and Inf, devices (the CPU, or ``meta`` for shapes only)
and backends. A valid case must give the naive reference's result (and, with gradients, finite
ones); a case with one deliberate mistake (a wrong shape, dtype or device, not a tensor at all,
...) must raise a ValueError or TypeError whose one-line message names the op. Never another
exception, never a hang.

Runs are reproducible (``derandomize``) and bounded (``max_examples``), for CI: about 25 s on a
loaded 2-core CPU machine. ``--hypothesis-show-statistics`` shows the mix of backends and devices.
"""
import contextlib
import math
import signal
from typing import Callable, Dict, List, Optional

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import crossvit_fast
from crossvit_fast import CrossViT, backends, ops, reference
from crossvit_fast.reference import naive_math

from .numerics import rel_err

# The Triton interpreter computes with numpy, which warns on the NaN and Inf drawn on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative error bars against float64 naive math (max |error| / max |reference|): the exact
# bars per dtype are test_ops.py's; these catch wrong results, not rounding.
BARS = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
CASE_SECONDS = 120   # a case past this counts as a hang (tiny shapes take well under a second)

BACKENDS = ["auto"] + [b for b in backends.CONCRETE_BACKENDS if backends.unavailable_reason(b, "cpu") is None]
DEVICES = ["cpu", "meta"]
# Mistakes every op must name; each op adds its own.
MISTAKES = ["shape", "dtype", "device", "not a tensor"]

_common = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VALID_CASES = settings(max_examples=60, **_common)
MISTAKEN_CASES = settings(max_examples=12, **_common)   # per kind of mistake
MODEL_CASES = settings(max_examples=30, **_common)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (rather than hang) when the block runs past ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"a case ran past {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- drawing inputs ------------------------------------------------------------------------------

class Case:
    """Random tensors from one drawn seed, and notes on how each was made (for a failure report)."""

    def __init__(self, draw: Callable):
        self.draw = draw
        self.seed = draw(st.integers(0, 2 ** 16))
        self.notes: List[str] = []

    def tensor(self, name: str, shape, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        """A ``shape`` tensor of ``dtype``, ``shift + scale * N(0, 1)``, in a drawn memory layout:
        contiguous, a strided view (every other element of the last dim) or transposed storage
        (the last two dims swapped in memory); 4-D ones also channels-last."""
        gen = torch.Generator().manual_seed(self.seed + len(self.notes))
        layouts = ["contiguous", "strided"] + ["transposed"] * (len(shape) >= 2) + ["channels_last"] * (len(shape) == 4)
        layout = self.draw(st.sampled_from(layouts))
        self.notes.append(f"{name}: {tuple(shape)} {dtype} {layout}")
        stored = {"strided": (*shape[:-1], 2 * shape[-1]),
                  "transposed": (*shape[:-2], *shape[-2:][::-1])}.get(layout, tuple(shape))
        t = (shift + scale * torch.randn(*stored, generator=gen, dtype=torch.float64)).to(dtype)
        if layout == "strided":
            return t[..., ::2]
        if layout == "transposed":
            return t.transpose(-1, -2)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    def poison(self, tensors: Dict[str, Optional[torch.Tensor]]) -> None:
        """Maybe write one NaN, +Inf or -Inf into one of ``tensors`` (in place, through views).

        Not into ``wk_bias``: the fused cross-attention never reads it (it shifts every score of
        a head alike, which the softmax cancels; design.md §2), so a NaN there, which makes all
        of timm's output NaN, leaves ours finite."""
        value = self.draw(st.sampled_from([None, math.nan, math.inf, -math.inf]))
        present = [k for k, t in tensors.items()
                   if t is not None and t.numel() and t.is_floating_point() and k != "wk_bias"]
        if value is None or not present:
            return
        name = self.draw(st.sampled_from(present))
        index = self.draw(st.integers(0, tensors[name].numel() - 1))
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), tensors[name].shape))
        tensors[name][position] = value
        self.notes.append(f"{name}[{position}] = {value}")


def make_mistake(mistake: str, name: str, inputs: dict, draw) -> None:
    """Make input ``name`` wrong in the way ``mistake`` says (in ``inputs``)."""
    t = inputs[name]
    if mistake == "shape":
        inputs[name] = torch.zeros(*t.shape[:-1], t.shape[-1] + draw(st.sampled_from([1, 2])), dtype=t.dtype)
    elif mistake == "dtype":
        inputs[name] = t.to(draw(st.sampled_from([torch.int32, torch.bool, torch.complex64])))
    elif mistake == "device":
        inputs[name] = t.to("meta")
    elif mistake == "not a tensor":
        inputs[name] = t.tolist()
    else:
        raise AssertionError(mistake)


def on_device(inputs: dict, device: str) -> dict:
    """``inputs`` (made on the CPU) moved to ``device``."""
    if device == "cpu":
        return inputs
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def as_float64(inputs: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def draw_param_dtype(draw, dtype: torch.dtype) -> torch.dtype:
    """The parameters' dtype for inputs of ``dtype``: their own (a model cast with ``.to``), or
    fp32 master weights below float64 (e.g. under autocast)."""
    return draw(st.sampled_from([dtype, torch.float64 if dtype == torch.float64 else torch.float32]))


# ---- checking results ----------------------------------------------------------------------------

def same_result(got: torch.Tensor, expected: torch.Tensor, what: str, notes: List[str],
                bar: Optional[float] = None) -> None:
    """``got`` equals the float64 ``expected``: same shape, the same elements non-finite, the
    finite ones within ``bar`` (by default that of ``got``'s dtype; on ``meta``: the shape alone)."""
    assert got.shape == expected.shape, (what, tuple(got.shape), tuple(expected.shape), notes)
    if got.device.type == "meta":
        return
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite), (what, "non-finite elements differ", notes)
    if finite.any():
        err = rel_err(got[finite], expected[finite])
        assert err <= (bar or BARS[got.dtype]), (what, f"relative error {err:.2e}", notes)


def run_with_gradients(run: Callable[[], torch.Tensor], inputs: dict, names: List[str], notes) -> torch.Tensor:
    """``run()`` with ``names`` requiring grad, then a backward through it, which must give each
    of them a gradient of its shape, finite wherever inputs and output are (the gradients'
    values against the reference are test_ops.py's)."""
    for name in names:
        inputs[name] = inputs[name].detach().requires_grad_()
    out = run()
    out.float().nan_to_num(0.0, 0.0, 0.0).sum().backward()
    all_finite = torch.isfinite(out).all() and all(
        t.isfinite().all() for t in inputs.values() if isinstance(t, torch.Tensor))
    for name in names:
        grad = inputs[name].grad
        assert grad is not None and grad.shape == inputs[name].shape, (name, notes)
        assert not all_finite or torch.isfinite(grad).all(), (f"d{name} is not finite", notes)
    return out.detach()


def check_valid(run, expected: Callable, inputs: dict, grad_names: List[str], with_grad: bool,
                device: str, notes) -> None:
    with time_limit(CASE_SECONDS):
        want = expected(as_float64(inputs))
        if with_grad and device == "cpu":
            got = run_with_gradients(run, inputs, grad_names, notes)
        else:
            got = run()
        for i, (g, e) in enumerate(zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want)))):
            same_result(g, e, f"output {i}", notes)


def expect_clear_error(run: Callable[[], object], op: str, notes: List[str]) -> None:
    """``run`` raises a ValueError or TypeError whose one-line message names ``op``."""
    with time_limit(CASE_SECONDS), pytest.raises((ValueError, TypeError)) as err:
        run()
    message = str(err.value)
    assert f"{op}: " in message and "\n" not in message, (message, notes)


def backend_and_device(draw, mistake: Optional[str]):
    """A backend and the device of every input: ``meta`` runs the shapes alone (the torch
    backend; no kernel runs on it). A device mistake puts one input on ``meta``, the rest here."""
    device = "cpu" if mistake == "device" else draw(st.sampled_from(DEVICES))
    backend = "auto" if device == "meta" else draw(st.sampled_from(BACKENDS))
    event(f"{backend} on {device}")
    return backend, device


# ---- cls_cross_attention -------------------------------------------------------------------------

@st.composite
def cross_attention_case(draw, mistake: Optional[str]):
    case = Case(draw)
    H = draw(st.integers(1, 3))
    C = H * draw(st.integers(1, 6))
    B, N = draw(st.integers(0, 3)), draw(st.integers(0, 9))
    dtype = draw(st.sampled_from(FLOATS))
    weights = draw_param_dtype(draw, dtype)
    tokens = case.tensor("tokens", (B, N + 1, C), dtype)
    cls_shape = (B, 1, C) if draw(st.booleans()) else (B, C)   # both are accepted
    inputs = dict(cls=case.tensor("cls", cls_shape, dtype), patches=tokens[:, 1:])   # as the model passes them
    inputs["norm_weight"] = case.tensor("norm_weight", (C,), weights, 0.2, 1.0)
    inputs["norm_bias"] = case.tensor("norm_bias", (C,), weights, 0.2)
    with_bias = draw(st.booleans())
    for name in ("wq", "wk", "wv", "proj"):
        inputs[f"{name}_weight"] = case.tensor(f"{name}_weight", (C, C), weights, C ** -0.5)
        inputs[f"{name}_bias"] = (case.tensor(f"{name}_bias", (C,), weights, 0.1)
                                  if with_bias or name == "proj" else None)
    case.poison(inputs)
    config = dict(num_heads=H, scale=(C // H) ** -0.5, eps=1e-6, add_residual=draw(st.booleans()))
    if mistake == "heads":
        config["num_heads"] = draw(st.sampled_from([0, -1, C + 1, 2.0]))
    elif mistake is not None:
        make_mistake(mistake, draw(st.sampled_from(sorted(k for k, v in inputs.items() if v is not None))),
                     inputs, draw)
    backend, device = backend_and_device(draw, mistake)
    case.notes += [f"config {config}", f"backend {backend} on {device}"]
    inputs = on_device(inputs, device)
    run = lambda: ops.cls_cross_attention(**inputs, **config, backend=backend)  # noqa: E731
    return case, inputs, config, run, device


def naive_cross_attention(inputs: dict, config: dict) -> torch.Tensor:
    cls = inputs["cls"]
    out = reference.cls_cross_attention(**dict(inputs, cls=cls.reshape(cls.shape[0], 1, cls.shape[-1])), **config)
    return out.reshape(cls.shape)


@VALID_CASES
@given(cross_attention_case(None), st.booleans())
def test_cls_cross_attention_matches_naive(drawn, with_grad):
    case, inputs, config, run, device = drawn
    check_valid(run, lambda x: naive_cross_attention(x, config), inputs, ["cls", "patches", "wq_weight"],
                with_grad, device, case.notes)


@pytest.mark.parametrize("mistake", MISTAKES + ["heads"])
@MISTAKEN_CASES
@given(data=st.data())
def test_cls_cross_attention_says_what_is_wrong(mistake, data):
    case, _, _, run, _ = data.draw(cross_attention_case(mistake))
    expect_clear_error(run, "cls_cross_attention", case.notes)


# ---- cls_projection ------------------------------------------------------------------------------

@st.composite
def projection_case(draw, mistake: Optional[str]):
    case = Case(draw)
    c_in, c_out = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    lead = draw(st.lists(st.integers(0, 3), max_size=3))
    dtype = draw(st.sampled_from(FLOATS))
    weights = draw_param_dtype(draw, dtype)
    inputs = dict(x=case.tensor("x", (*lead, c_in), dtype),
                  ln_weight=case.tensor("ln_weight", (c_in,), weights, 0.2, 1.0),
                  ln_bias=case.tensor("ln_bias", (c_in,), weights, 0.2),
                  weight=case.tensor("weight", (c_out, c_in), weights, c_in ** -0.5),
                  bias=case.tensor("bias", (c_out,), weights, 0.1))
    case.poison(inputs)
    if mistake == "no bias":
        inputs["bias"] = None
    elif mistake is not None:
        make_mistake(mistake, draw(st.sampled_from(sorted(inputs))), inputs, draw)
    backend, device = backend_and_device(draw, mistake)
    case.notes.append(f"backend {backend} on {device}")
    inputs = on_device(inputs, device)
    run = lambda: ops.cls_projection(**inputs, eps=1e-6, backend=backend)  # noqa: E731
    return case, inputs, run, device


@VALID_CASES
@given(projection_case(None), st.booleans())
def test_cls_projection_matches_naive(drawn, with_grad):
    case, inputs, run, device = drawn
    check_valid(run, lambda x: reference.cls_projection(**x, eps=1e-6), inputs, ["x", "weight"], with_grad,
                device, case.notes)


@pytest.mark.parametrize("mistake", MISTAKES + ["no bias"])
@MISTAKEN_CASES
@given(data=st.data())
def test_cls_projection_says_what_is_wrong(mistake, data):
    case, _, run, _ = data.draw(projection_case(mistake))
    expect_clear_error(run, "cls_projection", case.notes)


# ---- add_layer_norm and layer_norm ---------------------------------------------------------------

@st.composite
def layer_norm_case(draw, mistake: Optional[str]):
    case = Case(draw)
    C = draw(st.integers(1, 40))
    lead = draw(st.lists(st.integers(0, 4), max_size=3))
    dtype = draw(st.sampled_from(FLOATS))
    weights = draw_param_dtype(draw, dtype)
    residual_dtype = draw(st.sampled_from([None, dtype, torch.float32]))   # mixed dtypes promote
    inputs = dict(x=case.tensor("x", (*lead, C), dtype),
                  residual=None if residual_dtype is None else case.tensor("residual", (*lead, C), residual_dtype),
                  weight=case.tensor("weight", (C,), weights, 0.2, 1.0),
                  bias=case.tensor("bias", (C,), weights, 0.2))
    case.poison(inputs)
    if mistake == "no features":
        inputs["x"] = inputs["x"][..., :0]
    elif mistake is not None:
        make_mistake(mistake, draw(st.sampled_from(sorted(k for k, v in inputs.items() if v is not None))),
                     inputs, draw)
    backend, device = backend_and_device(draw, mistake)
    case.notes.append(f"backend {backend} on {device}")
    inputs = on_device(inputs, device)
    run = lambda: ops.add_layer_norm(**inputs, eps=1e-6, backend=backend)  # noqa: E731
    return case, inputs, run, device, backend


@VALID_CASES
@given(layer_norm_case(None))
def test_add_layer_norm_matches_naive(drawn):
    case, inputs, run, device, backend = drawn
    check_valid(run, lambda x: reference.add_layer_norm(**x, eps=1e-6), inputs, [], False, device, case.notes)
    if inputs["residual"] is None:
        y = ops.layer_norm(inputs["x"], inputs["weight"], inputs["bias"], backend=backend)
        same_result(y, reference.add_layer_norm(**as_float64(inputs), eps=1e-6)[0], "layer_norm", case.notes)


@pytest.mark.parametrize("mistake", MISTAKES + ["no features"])
@MISTAKEN_CASES
@given(data=st.data())
def test_add_layer_norm_says_what_is_wrong(mistake, data):
    case, _, run, _, _ = data.draw(layer_norm_case(mistake))
    expect_clear_error(run, "layer_norm", case.notes)


# ---- the model -----------------------------------------------------------------------------------

def tiny_model(dtype: torch.dtype) -> CrossViT:
    """Two branches, one multi-scale block: 4x4 and 3x3 patches of a 32-px image."""
    torch.manual_seed(0)
    model = CrossViT(img_size=32, img_scale=(1.0, 0.75), patch_size=(8, 8), embed_dim=(16, 32),
                     depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2, 2, 1), num_classes=5)
    return model.to(dtype).eval()


MODELS = {dtype: tiny_model(dtype) for dtype in (torch.float32, torch.float64)}


@st.composite
def image_case(draw, mistake: Optional[str]):
    case = Case(draw)
    model_dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    dtype = model_dtype
    if mistake == "dtype":   # outside autocast the image must have the model's dtype
        dtype = draw(st.sampled_from([d for d in FLOATS if d != model_dtype] + [torch.uint8, torch.int64]))
    size = draw(st.sampled_from([(32, 32), (24, 40), (33, 31)]))   # others are rescaled, as in timm
    x = case.tensor("x", (draw(st.integers(0, 3)), 4 if mistake == "channels" else 3, *size), dtype)
    case.poison({"x": x})
    x = {None: x, "dtype": x, "channels": x, "device": x.to("meta"), "not a tensor": x.tolist(),
         "3-D": x.flatten(0, 1), "shape": x.unsqueeze(0)}[mistake]
    backend = draw(st.sampled_from(BACKENDS))
    event(backend)
    case.notes.append(f"model {model_dtype}, backend {backend}")
    return case, MODELS[model_dtype], x, backend


@MODEL_CASES
@given(image_case(None), st.sampled_from([None, torch.bfloat16]), st.booleans())
@pytest.mark.filterwarnings("ignore:CrossViT. input images of:UserWarning")   # the rescaled sizes
def test_model_matches_naive(drawn, autocast, with_grad):
    """Logits (and, with gradients, the image's gradient) as the naive model gives them, with
    the same dtype and autocast setting."""
    case, model, x, backend = drawn
    case.notes.append(f"autocast {autocast}, gradients {with_grad}")
    results = []
    with time_limit(CASE_SECONDS), torch.set_grad_enabled(with_grad):
        for naive in (False, True):
            image = x.detach().requires_grad_(with_grad)
            with crossvit_fast.use_backend(backend), naive_math(naive), \
                    torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                logits = model(image)
            if with_grad:
                logits.float().nan_to_num(0.0, 0.0, 0.0).sum().backward()
            results.append((logits.detach(), image.grad))
    (got, got_grad), (expected, expected_grad) = results
    # autocast computes float32 models' products in bf16 (float64 ones as they are)
    bar = BARS[torch.bfloat16] if autocast and x.dtype == torch.float32 else None
    same_result(got, expected.double(), "logits", case.notes, bar)
    if with_grad:
        same_result(got_grad, expected_grad.double(), "image gradient", case.notes, bar)


@pytest.mark.parametrize("mistake", ["dtype", "channels", "device", "not a tensor", "3-D", "shape"])
@MISTAKEN_CASES
@given(data=st.data())
def test_model_says_what_is_wrong(mistake, data):
    case, model, x, backend = data.draw(image_case(mistake))
    with crossvit_fast.use_backend(backend):
        expect_clear_error(lambda: model(x), "CrossViT", case.notes)
