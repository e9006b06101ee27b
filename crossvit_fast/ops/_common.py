"""Helpers shared by the custom ops: backend dispatch, accumulation dtype, autocast isolation."""
from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._C import _functorch

from .. import backends, reference
from ..backends import torch_backend


def backend_impl(requested: str, device: torch.device) -> ModuleType:
    """The module of the concrete backend that serves ``requested`` on ``device``."""
    return _impl_for(requested, device)


@functools.lru_cache(maxsize=None)
def _impl_for(requested: str, device: torch.device) -> ModuleType:
    # availability is fixed per process (backends caches it), so the answer can be cached too
    return backends.implementation(backends.resolve(requested, device))


def requested_backend(backend: Optional[str]) -> str:
    """The per-call choice if given, else the current global/context choice (validated); under
    ``torch.func``'s transforms (``grad``, ``jacrev``, ``vmap``) the PyTorch backend, whose ATen
    ops they transform: the Triton and CUDA kernels cannot read their wrapped tensors."""
    name = backends.get_backend() if backend is None else backends.check_name(backend, "backend")
    return "torch" if reference._functorch_transform_active() else name


def acc_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (the tests' reference precision); anything else accumulates in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype`` (None stays None). Checks the dtype first: ``Tensor.to`` costs about 2 µs
    of host time even when it has nothing to do, and the ops make a dozen such calls."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on ``device_type``, or None where it is off. Devices that
    autocast does not know (``meta``, used for shape and FLOP counting) count as off, where
    ``torch.is_autocast_enabled`` would raise.

    That availability check is skipped while ``torch.compile`` traces: dynamo 2.11 cannot trace
    ``torch.amp.is_autocast_available`` and broke the graph at every call (24 graphs for one
    crossvit_18_240 forward), and traced tensors are never on the meta device."""
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def without_autocast(fn):
    """Run an op implementation with autocast off: it chooses its own precision per product."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = args[0].device.type
        if autocast_dtype(device_type) is None:
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def eager_autograd(name: str, forward: Callable, setup_context: Callable,
                   backward: Callable) -> Callable:
    """``apply`` of an autograd.Function that runs an op's implementation directly.

    Eager calls take this path: the ``torch.library`` custom op costs tens of microseconds of
    host time per call (schema dispatch, autograd wrapping), several times a small kernel's run
    time. Under ``torch.compile`` the public functions call the custom op instead (see
    :func:`choose`), which has the fake implementation the compiler needs. ``forward``,
    ``setup_context`` and ``backward`` are the ones the custom op registers, so both paths compute
    the same thing; the backward is not differentiable again (as with the custom op: see
    :func:`_first_order_only`). Without gradients, :func:`choose` skips even this Function.
    """
    # forward and setup_context apart (not forward(ctx, ...)): the form torch.func.grad accepts
    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(_first_order_only(name, backward))})
    return function.apply


class _OwnGradient(torch.autograd.Function):
    """Identity whose backward hands on a copy of its incoming gradient."""

    @staticmethod
    def forward(t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def own_gradient_if_leaves(t: Tensor, other: Tensor) -> Tensor:
    """``t``, whose gradient comes as a copy where ``t`` and ``other`` are both leaves that
    require grad, for an op whose backward gives both the same gradient (``x + residual``).

    Each leaf gets that gradient through its own reshape view, and torch keeps a view it is
    handed as ``.grad`` without copying it (pytorch#34082): the two ``.grad`` would share memory,
    and the next backward (accumulating into one in place) or a ``zero_()`` would change both.
    Inputs that are not leaves (a model's activations) pass their gradients on without keeping
    them: they take no copy."""
    if (torch.is_grad_enabled() and t.requires_grad and other.requires_grad and t.is_leaf
            and other.is_leaf):
        return _OwnGradient.apply(t)
    return t


class _NotDifferentiable(torch.autograd.Function):
    """``apply(message, n, *results, *sources)``: aliases of the ``n`` results whose backward
    raises ``message``, linked to ``sources`` (the backward's incoming gradients and saved
    tensors) so that every second-order gradient that would flow through the results reaches
    the error, whichever tensors it is taken for."""

    @staticmethod
    def forward(message: str, num_results: int, *tensors: Tensor):
        return tuple(t.view_as(t) for t in tensors[:num_results])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _first_order_only(name: str, backward: Callable) -> Callable:
    """``backward`` run without recording, whose results raise if they are differentiated.

    ``once_differentiable`` is not enough: it hangs its error on detached copies, which a
    second-order ``autograd.grad(..., inputs=x)`` prunes, and adds none when no incoming
    gradient requires grad; the second-order gradient then silently lacked this op's part.
    Nested ``torch.func`` transforms (``grad`` of ``grad``) record the backward at the outer
    level whatever ``no_grad`` says: there it raises at once.
    """
    message = (f"crossvit_fast: the backward of {name} is not differentiable (double backward: "
               f"create_graph=True, gradient penalties, nested torch.func.grad). Run the model "
               f"inside crossvit_fast.reference.naive_math() for timm's math, which is")

    def first_order(ctx, *grads):
        level = _functorch.maybe_current_level()   # torch.func transforms' nesting depth
        if level is not None and level > 1:
            raise RuntimeError(message)
        with torch.no_grad():
            results = backward(ctx, *grads)
        if level is not None or not torch.is_grad_enabled():
            return results
        sources = [t for t in (*grads, *ctx.saved_tensors) if t is not None and t.requires_grad]
        present = [t for t in results if t is not None]
        if not sources or not present:
            return results
        aliases = iter(_NotDifferentiable.apply(message, len(present), *present, *sources))
        return tuple(None if t is None else next(aliases) for t in results)
    return first_order


def compiler_triton_op(name: str, body: Callable):
    """``body`` registered as ``torch.library.triton_op`` ``name``: an op that the compiler
    decomposes into the Triton kernel launches ``body`` records (see ``kernels._launch.traced``),
    so that inductor runs them from its own generated code. None on a torch without
    ``triton_op`` (before 2.6): the Triton backend then stays an opaque custom op there."""
    triton_op = getattr(torch.library, "triton_op", None)
    return None if triton_op is None else triton_op(name, body, mutates_args=())


def traced_triton() -> SimpleNamespace:
    """The Triton backend's primitives with their launches recorded (``triton_backend.TRACED``)."""
    from ..backends import triton_backend
    return triton_backend.TRACED


@torch.compiler.assume_constant_result   # run once while tracing, not traced into
def _compiler_sees_triton(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs the Triton kernels on ``device`` and the compiler can record
    their launches (Triton compiles them; its CPU interpreter's cannot be recorded), for
    ``torch.compile``: ``torch.export`` keeps op calls, and the backend-neutral one is kept
    there, not one tied to Triton. (Asked here, run once for real: dynamo 2.11 folds
    ``is_exporting()`` to True in every trace.)"""
    from ..backends import triton_backend
    return (not torch.compiler.is_exporting() and backend_impl(backend, device) is triton_backend
            and triton_backend.recordable())


def choose(custom_op: Callable, eager: Callable, forward: Callable, backend: str,
           device: torch.device, triton_op: Optional[Callable] = None) -> Callable:
    """What a public op calls for ``backend`` on ``device``: while ``torch.compile``/``torch.export``
    traces, ``triton_op`` (the op's Triton form, see :func:`compiler_triton_op`) where the
    backend is Triton and the compiler can record its kernels (not for ``torch.export``), else
    the custom op; outside a trace, the eager Function, or, with gradients off (inference), the
    forward itself (no autograd bookkeeping).

    Under ``torch.jit.trace`` the Triton and CUDA backends also take the custom op: the trace
    records one op call, where their kernel launches could not be recorded. The PyTorch backend
    runs the forward itself, with or without gradients (its ATen ops are differentiable as
    they are), so that its trace is ATen ops alone, which a process without crossvit_fast
    (libtorch) can load; the eager Function would be an unsaveable Python op.

    Under ONNX export every backend runs the PyTorch backend's forward: ONNX has no
    crossvit_fast op, and that forward is the same absorbed math in ATen ops (the token pass
    without K or V), which both exporters translate. Both exporters trace (the default one with
    torch.export, the other with torch.jit.trace), so the plain eager call never asks. The
    forwards take the backend last.
    """
    if torch.compiler.is_compiling():
        if torch.onnx.is_in_onnx_export():
            return functools.partial(_on_backend, forward, "torch")
        if triton_op is not None and _compiler_sees_triton(backend, device):
            return triton_op
        return custom_op
    if torch.jit.is_tracing():
        if torch.onnx.is_in_onnx_export() or backend_impl(backend, device) is torch_backend:
            return functools.partial(_on_backend, forward, "torch")
        return custom_op
    return eager if torch.is_grad_enabled() else forward


def _on_backend(forward: Callable, backend: str, *args):
    """``forward`` with its last argument, the backend, replaced by ``backend``."""
    return forward(*args[:-1], backend)


def cast_like(grad: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    """``grad`` in ``like``'s dtype, or None where there was no input to differentiate."""
    if like is None or grad is None:
        return None
    return grad.to(like.dtype)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(name: str, t: Tensor, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_same_device(op: str, **tensors: Optional[Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")


def check_vector(op: str, name: str, t: Optional[Tensor], size: int, optional: bool = False) -> None:
    """A ``[size]`` float parameter vector; None only where ``optional`` (e.g. a Linear's bias)."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} must be a float tensor of shape ({size},), got None")
    check_float_tensor(name, t, op)
    if tuple(t.shape) != (size,):
        raise ValueError(f"{op}: {name} must have shape ({size},), got {tuple(t.shape)}")
