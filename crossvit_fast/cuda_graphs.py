"""Opt-in CUDA-graph inference: replay a captured forward instead of launching ~100 kernels.

At small batch the GPU finishes each kernel before Python has launched the next, so latency is
the sum of launch overheads; replaying a CUDA graph launches the whole forward at once.

    fast = crossvit_fast.GraphedInference(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = fast(images)        # first call per shape/dtype/autocast setting captures

A graph is captured per input shape, dtype and autocast setting, and per setting that chooses
the forward's kernels (the backend, ``naive_math``, the experimental fused CLS ops and two
streams) or its kernels' precision (TF32, the attention backends enabled). Parameters are read in
place, so ``load_state_dict`` and optimizer steps on the model are seen by later replays; what
gives a parameter new memory is not (assigning a new ``nn.Parameter``, ``model.half()`` or
``.to()``, ``load_state_dict(assign=True)``), nor are hooks registered after a capture: call
:meth:`GraphedInference.reset` after either (the wrapper's own ``.half()``, ``.to()`` and
``.cuda()`` reset it themselves).

A wrapper's graphs share one memory pool per GPU, and its calls run one after another whatever
stream or thread makes them: each call waits for the last one's replay and output copy, since
they read and write the same buffers.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, NamedTuple, Tuple

import torch
from torch import Tensor, nn

from . import backends, branch_streams, layers, reference
from .layers import always_fuse_norms


def _uncached_autocast():
    """The caller's CUDA autocast setting with its cast cache off (a no-op without autocast),
    as ``torch.cuda.make_graphed_callables`` requires."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _static_copy(x: Tensor) -> Tensor:
    """A copy of ``x`` that later calls can copy their inputs into, whether or not they run
    under ``torch.inference_mode``: made outside it (a tensor made inside could only be written
    inside it)."""
    with torch.inference_mode(False):
        return x.clone()


# One call of any wrapper at a time: captures must not overlap in the process (torch's rule),
# and a wrapper's replays share its buffers.
_CALLS = threading.Lock()


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    static_in: Tensor
    static_out: Tensor


def _fp32_precisions() -> Tuple[str, str, str]:
    """The fp32 precision settings (TF32 or not) of matmuls and cuDNN convolutions, read through
    torch's per-backend API: it follows the legacy setters too, and, unlike
    ``torch.get_float32_matmul_precision()`` or ``allow_tf32``, does not raise once a program has
    set TF32 through it."""
    return (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision)


class GraphedInference(nn.Module):
    """Inference-only wrapper of ``model`` (called under ``no_grad``, in eval mode)."""

    def __init__(self, model: nn.Module, warmup_iters: int = 3):
        super().__init__()
        if not isinstance(warmup_iters, int) or warmup_iters < 1:
            raise ValueError("GraphedInference: warmup_iters must be an int of at least 1 (the "
                             "first calls compile and tune kernels, which a capture cannot), got "
                             f"{warmup_iters!r}")
        self.model = model
        self.warmup_iters = warmup_iters
        self.reset()

    def reset(self) -> None:
        """Forget every captured graph (they are recaptured on the next calls)."""
        self._graphs: Dict[Tuple, _Captured] = {}
        self._pools: Dict[torch.device, Tuple[int, int]] = {}     # per GPU, shared by its graphs
        self._last_call: Dict[torch.device, torch.cuda.Event] = {}  # per GPU: the last call's end

    def _apply(self, fn, *args, **kwargs):
        """``.half()``, ``.to()``, ``.cuda()`` and the like give the parameters new memory, which
        no captured graph reads: forget the graphs."""
        self.reset()
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def _key(x: Tensor) -> Tuple:
        """What a captured graph holds fixed: the input's shape, dtype and device, the autocast
        setting, and the settings that choose the forward's kernels (the backend requested,
        timm's naive math, the fused CLS projection, the fused CLS exchange and its batch limit,
        the branches on two streams)."""
        autocast = torch.is_autocast_enabled("cuda")
        return (tuple(x.shape), x.dtype, x.device,
                autocast, torch.get_autocast_dtype("cuda") if autocast else None,
                backends.get_backend(), reference.naive_enabled(),
                layers.FUSED_CLS_PROJECTION, layers.FUSED_CLS_EXCHANGE,
                layers.FUSED_CLS_EXCHANGE_MAX_BATCH, branch_streams.enabled_here(),
                *_fp32_precisions(),
                torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())

    def _capture(self, x: Tensor) -> _Captured:
        static_in = _static_copy(x)
        if x.device not in self._pools:
            self._pools[x.device] = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        # A replay costs no host time per kernel, so the fused norms pay at every size. Under
        # autocast the weights' casts are made afresh in the graph, not read from autocast's
        # cache: those cached copies are freed when the caller's autocast block ends (a graph
        # reading them would read reused memory), and would not follow in-place weight changes.
        with always_fuse_norms(), _uncached_autocast():
            with torch.cuda.stream(stream):   # warm-up off the default stream, as capture requires
                for _ in range(self.warmup_iters):
                    self.model(static_in)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # on x's GPU's stream: torch's default capture stream is made once per process, on the
            # GPU current at the first capture of any graph
            with torch.cuda.graph(graph, pool=self._pools[x.device], stream=stream):
                static_out = self.model(static_in)
        return _Captured(graph, static_in, static_out)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_cuda:
            raise ValueError(f"GraphedInference: x must be a CUDA tensor, got "
                             f"{x.device if isinstance(x, Tensor) else type(x).__name__}")
        if self.model.training:
            raise RuntimeError("GraphedInference: the model is in training mode; call model.eval() "
                               "(dropout and stochastic depth cannot be replayed)")
        # on x's GPU whichever is current: capture and replay use the current device's streams
        with _CALLS, torch.cuda.device(x.device):
            key = self._key(x)
            if key not in self._graphs:
                self._graphs[key] = self._capture(x)
            captured = self._graphs[key]
            stream = torch.cuda.current_stream(x.device)
            last_call = self._last_call.get(x.device)
            if last_call is None:
                last_call = self._last_call[x.device] = torch.cuda.Event()
            stream.wait_event(last_call)    # a call on another stream may still use the buffers
            captured.static_in.copy_(x)
            captured.graph.replay()
            out = captured.static_out.clone()
            last_call.record(stream)
            return out
