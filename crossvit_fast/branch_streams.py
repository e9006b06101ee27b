"""CrossViT's two branches on two CUDA streams, for replays where the GPU waits on latency.

Within a multi-scale block the two branches' ViT blocks do not depend on each other, and nor do
the two CLS exchanges that follow. At small batch each of their kernels fills a fraction of the
GPU and a CUDA-graph replay (no host time between kernels) spends its time on the kernels'
latency, one after the other: running branch 0's work on a second stream lets the two overlap.
Eagerly, where the host launching the kernels sets the pace, this gains nothing and costs host
time, so it is off unless asked for (:func:`concurrent_branches`, which a capture may enter).
Not yet timed on a GPU (scripts/graphs_ab.py measures it): off by default everywhere.

The streams' ordering and the caching allocator's are kept as ``torch.cuda.Stream`` asks: the
side stream waits for the current one before it starts, the current one waits for it before
reading its results, and each tensor read on a stream it was not allocated on is recorded
there (``Tensor.record_stream``), so that its memory is not reused while that stream may still
read it. Off CUDA the two calls run one after the other, on the same code path. The side
stream comes from torch's stream pool, which other code may be handed too (work there is then
ordered behind theirs, not lost); where it is the current stream, the steps run in turn.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, List, Sequence

import torch
from torch import Tensor

# Per thread: whether multi-scale blocks run their two branches on two streams (CUDA tensors
# only), and each device's side stream. Per thread, so that one thread's capture (which takes
# its side stream into the graph) never meets another thread's work on the same stream.
_local = threading.local()


@contextlib.contextmanager
def concurrent_branches(enabled: bool = True) -> Iterator[None]:
    """Inside the block, in this thread, multi-scale blocks run their two branches on two CUDA
    streams (``enabled``) or one after the other; the previous setting comes back after it."""
    saved, _local.enabled = enabled_here(), enabled
    try:
        yield
    finally:
        _local.enabled = saved


def enabled_here() -> bool:
    """Whether :func:`concurrent_branches` is in force in this thread."""
    return getattr(_local, "enabled", False)


def enabled_for(x: Tensor) -> bool:
    """Whether work on ``x`` runs its branches concurrently: asked for in this thread, and not
    where streams cannot be recorded (``torch.compile``, ``torch.jit.trace``)."""
    return enabled_here() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """This thread's second stream on ``device``, made once (from torch's stream pool)."""
    streams = getattr(_local, "side_streams", None)
    if streams is None:
        streams = _local.side_streams = {}
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
    return stream


def run_pair(step: Callable[[int], Tensor], side_reads: Sequence[Tensor]) -> List[Tensor]:
    """``[step(0), step(1)]``: ``step(0)`` on this thread's side stream and ``step(1)`` on the
    current one, on CUDA; one after the other elsewhere, or where the pool's side stream is the
    current stream. ``side_reads``: the tensors made before that ``step(0)`` reads (its first
    is also the device's witness)."""
    device = side_reads[0].device
    if device.type != "cuda":
        return [step(0), step(1)]
    current, side = torch.cuda.current_stream(device), _side_stream(device)
    if side == current:
        return [step(0), step(1)]
    side.wait_stream(current)
    for t in side_reads:
        t.record_stream(side)
    try:
        with torch.cuda.stream(side):
            first = step(0)
        second = step(1)
    finally:   # joined even where a step raises: a capture must end with every fork joined
        current.wait_stream(side)
    first.record_stream(current)
    return [first, second]
