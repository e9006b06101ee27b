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


@gpu
def test_autocast_replays_do_not_read_autocasts_freed_weight_casts():
    """Under autocast the graph makes the weights' casts itself: autocast's cached copies are
    freed when the caller's autocast block ends, and their memory is reused (here by a second
    capture and by filler tensors), while the first graph keeps replaying."""
    model = small_model().cuda().eval()
    fast = GraphedInference(model)
    x1, x4 = (torch.randn(b, 3, 48, 48, device="cuda") for b in (1, 4))
    for x in (x1, x4):                              # each captured in its own autocast block
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast(x)
    # small blocks, as the small model's weight casts are: the allocator's small-block pool
    filler = [torch.full((n,), float("nan"), device="cuda") for n in range(64, 8192, 16)]  # noqa: F841
    with torch.no_grad():
        model.head[0].weight.mul_(2)                # an in-place change the casts must follow
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, expected = fast(x1), model(x1)
    assert torch.isfinite(got).all() and rel_err(got, expected) < 1e-2


@gpu
def test_a_capture_follows_the_kernel_settings_it_was_made_with():
    from crossvit_fast import branch_streams, layers
    model = small_model().cuda().eval()
    fast = GraphedInference(model)
    x = torch.randn(1, 3, 48, 48, device="cuda")
    fast(x)
    with branch_streams.concurrent_branches():
        fast(x)
    saved, layers.FUSED_CLS_PROJECTION = layers.FUSED_CLS_PROJECTION, True
    try:
        fast(x)
    finally:
        layers.FUSED_CLS_PROJECTION = saved
    assert len(fast._graphs) == 3


def test_the_graph_key_holds_the_backend_and_naive_math():
    """A capture is made per backend requested and per naive-math setting: under another, the
    model runs other kernels, which replaying the first graph would silently skip."""
    from crossvit_fast import use_backend
    from crossvit_fast.reference import naive_math
    x = torch.randn(1, 3, 48, 48)
    key = GraphedInference._key(x)
    with use_backend("torch"):
        assert GraphedInference._key(x) != key
    with naive_math():
        assert GraphedInference._key(x) != key
    assert GraphedInference._key(x) == key


@pytest.fixture
def fp32_precisions_restored():
    """torch's fp32 precision settings, put back as they were (through its per-backend API,
    which the legacy setters cannot restore once it has been used)."""
    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
             torch.backends.cudnn.conv.fp32_precision)
    yield
    (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
     torch.backends.cudnn.conv.fp32_precision) = saved


def test_the_graph_key_holds_the_kernels_precision_settings(fp32_precisions_restored):
    """TF32 and the attention backends enabled choose other kernels: a graph captured under one
    setting is not replayed under another."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x = torch.randn(1, 3, 48, 48)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    key = GraphedInference._key(x)
    torch.set_float32_matmul_precision("high")
    assert GraphedInference._key(x) != key
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    assert GraphedInference._key(x) != key
    torch.backends.cudnn.allow_tf32 = True
    assert GraphedInference._key(x) == key
    with sdpa_kernel(SDPBackend.MATH):
        assert GraphedInference._key(x) != key
    assert GraphedInference._key(x) == key


def test_the_graph_key_follows_tf32_set_through_torchs_per_backend_api(fp32_precisions_restored):
    """Once TF32 is set as torch's docs advise (was: RuntimeError from
    ``torch.get_float32_matmul_precision()`` on every call, the legacy and new APIs mixed)."""
    x = torch.randn(1, 3, 48, 48)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    tf32 = GraphedInference._key(x)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert GraphedInference._key(x) != tf32
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert GraphedInference._key(x) != tf32
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert GraphedInference._key(x) == tf32


def test_the_wrappers_own_casts_and_moves_forget_the_graphs():
    """``fast.half()`` gives the parameters new memory: a graph kept would read the freed fp32
    weights."""
    fast = GraphedInference(small_model().eval())
    for convert in (lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.float()):
        fast._graphs[("a key",)] = None
        assert convert(fast) is fast and fast._graphs == {}
    assert fast.model.head[0].weight.dtype == torch.float32


@pytest.mark.parametrize("warmup_iters", [0, -1, 1.5])
def test_warmup_iters_below_one_is_refused(warmup_iters):
    with pytest.raises(ValueError, match="warmup_iters must be an int of at least 1"):
        GraphedInference(small_model(), warmup_iters=warmup_iters)


def test_the_static_input_is_writable_in_and_out_of_inference_mode():
    """A first call under inference_mode must not leave an input buffer that only
    inference-mode calls may write (and the other way round)."""
    from crossvit_fast.cuda_graphs import _static_copy
    with torch.inference_mode():
        static = _static_copy(torch.randn(2, 3))
    with torch.no_grad():
        static.copy_(torch.ones(2, 3))
    with torch.inference_mode():
        static.copy_(torch.zeros(2, 3))
    assert not static.is_inference() and torch.equal(static, torch.zeros(2, 3))


@gpu
def test_a_capture_under_inference_mode_replays_outside_it():
    model = small_model().cuda().eval()
    fast = GraphedInference(model)
    x = torch.randn(2, 3, 48, 48, device="cuda")
    with torch.inference_mode():
        first = fast(x)
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < FP32_PAIR_TOL
    with torch.inference_mode():
        assert rel_err(fast(x), first) < FP32_PAIR_TOL
    assert len(fast._graphs) == 1


@gpu
def test_calls_on_two_streams_do_not_share_the_buffers_at_once():
    """A call on a side stream, then one on the default stream without a synchronize: the second
    must not overwrite the input or output buffers while the first still replays or copies."""
    model = small_model().cuda().eval()
    fast = GraphedInference(model)
    xs = [torch.randn(64, 3, 48, 48, device="cuda") for _ in range(2)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
        fast(xs[0])                                   # capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        for _ in range(3):
            with torch.cuda.stream(side):
                first = fast(xs[0])
            second = fast(xs[1])
            torch.cuda.synchronize()
            assert rel_err(first, expected[0]) < FP32_PAIR_TOL
            assert rel_err(second, expected[1]) < FP32_PAIR_TOL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_the_second_gpu_is_captured_and_replayed_there():
    """After a capture on the first GPU (which makes torch's default capture stream there), a
    model on the second is captured on its own GPU's stream: a replay with a new input follows
    it."""
    GraphedInference(small_model().cuda(0).eval())(torch.randn(1, 3, 48, 48, device="cuda:0"))
    model = small_model().cuda(1).eval()
    fast = GraphedInference(model)
    x1, x2 = (torch.randn(2, 3, 48, 48, device="cuda:1") for _ in range(2))
    torch.cuda.set_device(0)
    with torch.no_grad():
        fast(x1)
        for x in (x2, x1):
            got, expected = fast(x), model(x)
            assert got.device == x.device and rel_err(got, expected) < FP32_PAIR_TOL
