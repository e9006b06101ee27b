"""GraphedInference: replays match eager, per shape and autocast setting; bad uses are refused."""
import pytest
import torch

from crossvit_fast import GraphedInference

from .numerics import FP32_PAIR_TOL, rel_err
from .test_model import small_model

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_input_and_training_mode_are_refused():
    model = small_model()
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        GraphedInference(model.eval())(torch.randn(1, 3, 48, 48))
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="training mode"):
            GraphedInference(model.cuda().train())(torch.randn(1, 3, 48, 48, device="cuda"))


@gpu
def test_replays_match_eager_and_follow_new_inputs_and_weights():
    model = small_model().cuda().eval()
    fast = GraphedInference(model)
    for batch in (1, 3, 1):                         # two shapes, one reused
        x = torch.randn(batch, 3, 48, 48, device="cuda")
        with torch.no_grad():
            assert rel_err(fast(x), model(x)) < FP32_PAIR_TOL
    with torch.no_grad():
        model.head[0].weight.mul_(2)                # in-place weight change is seen
        assert rel_err(fast(x), model(x)) < FP32_PAIR_TOL
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert rel_err(fast(x), model(x)) < 1e-2
    assert len(fast._graphs) == 3
