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
read it. Off CUDA the two calls run one after the other, on the same code path.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Sequence

import torch
from torch import Tensor

# Whether multi-scale blocks run their two branches on two streams (CUDA tensors only).
CONCURRENT_BRANCHES = False

_side_streams: Dict[torch.device, "torch.cuda.Stream"] = {}


@contextlib.contextmanager
def concurrent_branches(enabled: bool = True) -> Iterator[None]:
    """Inside the block, multi-scale blocks run their two branches on two CUDA streams
    (``enabled``) or one after the other; the previous setting comes back after it."""
    global CONCURRENT_BRANCHES
    saved, CONCURRENT_BRANCHES = CONCURRENT_BRANCHES, enabled
    try:
        yield
    finally:
        CONCURRENT_BRANCHES = saved


def enabled_for(x: Tensor) -> bool:
    """Whether work on ``x`` runs its branches concurrently: asked for, and not where streams
    cannot be recorded (``torch.compile``, ``torch.jit.trace``)."""
    return (CONCURRENT_BRANCHES and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The second stream of ``device``, made once (a stream per call would leak handles)."""
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device)
    return stream


def run_pair(step: Callable[[int], Tensor], reads: Sequence[Tensor]) -> List[Tensor]:
    """``[step(0), step(1)]``, ``step(0)`` on the side stream and ``step(1)`` on the current
    one where ``reads`` (every tensor either step reads that was made before) are CUDA tensors;
    one after the other otherwise."""
    device = reads[0].device
    if device.type != "cuda":
        return [step(0), step(1)]
    current, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(current)
    for t in reads:
        t.record_stream(side)
    with torch.cuda.stream(side):
        first = step(0)
    second = step(1)
    current.wait_stream(side)
    first.record_stream(current)
    return [first, second]
