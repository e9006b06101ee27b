"""The two branches on two CUDA streams (crossvit_fast.branch_streams): the same logits as one
after the other, eagerly and in a CUDA-graph replay; only where asked for, in inference, with
nothing hooked. Off CUDA the concurrent path runs its two steps in turn (checked here on the CPU)."""
import pytest
import torch

from crossvit_fast import GraphedInference, branch_streams
from crossvit_fast.model import MultiScaleBlock

from .conftest import DEVICE
from .numerics import FP32_PAIR_TOL, rel_err
from .test_model import small_model

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _spy_concurrent(monkeypatch):
    """Records, per multi-scale block call, whether it took the concurrent path."""
    taken = []
    concurrent = MultiScaleBlock._concurrent
    monkeypatch.setattr(MultiScaleBlock, "_concurrent",
                        lambda self, x: taken.append(concurrent(self, x)) or taken[-1])
    return taken


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_concurrent_branches_give_the_serial_logits(device, monkeypatch):
    model = small_model().to(device).eval()
    x = torch.randn(2, 3, 48, 48, device=device)
    taken = _spy_concurrent(monkeypatch)
    with torch.no_grad():
        serial = model(x)
        assert taken == [False] * 3
        with branch_streams.concurrent_branches():
            concurrent = model(x)
        assert taken[3:] == [True] * 3
    assert not branch_streams.enabled_here()
    if device == "cpu":   # the same ops in the same order
        assert torch.equal(concurrent, serial)
    else:
        assert rel_err(concurrent, serial) < FP32_PAIR_TOL


def test_concurrent_branches_only_in_inference_with_nothing_hooked_or_recorded(monkeypatch):
    model = small_model().to(DEVICE).eval()
    x = torch.randn(1, 3, 48, 48, device=DEVICE)
    taken = _spy_concurrent(monkeypatch)
    with branch_streams.concurrent_branches():
        model(x).sum().backward()                                   # gradients on: one stream
        handle = model.blocks[1].fusion[0].register_forward_hook(lambda *args: None)
        with torch.no_grad():
            model(x)
        handle.remove()
        with torch.no_grad():
            model(x)
        model.forward_attention_maps(x)                             # maps recorded: one stream
    assert taken == [False] * 3 + [True, False, True] + [True] * 3 + [False] * 3


@gpu
def test_graphed_replay_with_concurrent_branches_matches_eager():
    model = small_model().cuda().eval()
    fast = GraphedInference(model)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 48, 48, device="cuda")
        with torch.no_grad(), branch_streams.concurrent_branches():
            got = fast(x)
            got = fast(x)                                           # a replay
        with torch.no_grad():
            assert rel_err(got, model(x)) < FP32_PAIR_TOL
