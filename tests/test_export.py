"""Deployment as timm deploys: ONNX with torch's default exporter (dynamo) and the TorchScript one,
run by onnxruntime (torch.export → AOTInductor: test_aotinductor.py).

Under ONNX export every backend's ops run the PyTorch backend's math in ATen ops (ONNX knows no
crossvit_fast op): the same absorbed cross-attention, so the exported graph still forms no K or V
over the tokens.
"""
import pytest
import torch

import crossvit_fast

from .conftest import backend_param
from .numerics import FP32_REL_TOL, rel_err
from .test_model import small_model
from .timm_import import import_timm

onnx = pytest.importorskip("onnx", reason="pip install -e '.[test]' brings onnx")
ort = pytest.importorskip("onnxruntime", reason="pip install -e '.[test]' brings onnxruntime")
pytest.importorskip("onnxscript", reason="torch's default ONNX exporter needs onnxscript")

from .onnx_graph import product_macs  # noqa: E402  (needs onnx)

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]
# The TorchScript exporter (``dynamo=False``, no longer torch's default) on one variant of each
# structure: 240 px, the dagger's convolutional stem, 408 px. Each export takes 20 to 50 s here.
TORCHSCRIPT_VARIANTS = ("crossvit_tiny_240", "crossvit_9_dagger_240", "crossvit_15_dagger_408")


def export_onnx(model, x, path, dynamo: bool) -> None:
    """``torch.onnx.export`` as a user calls it, with the batch axis dynamic."""
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning",
                            "ignore::FutureWarning")
@pytest.mark.parametrize("name, dynamo", [
    *((name, True) for name in crossvit_fast.list_models()),
    *((name, False) for name in TORCHSCRIPT_VARIANTS)],
    ids=lambda v: {True: "dynamo", False: "torchscript"}.get(v, v))
def test_onnx_export_runs_in_onnxruntime_and_matches(name, dynamo, tmp_path):
    """Every variant with torch's default exporter, and :data:`TORCHSCRIPT_VARIANTS` with the
    TorchScript one: onnxruntime's logits at a batch size other than the exported one are within
    fp32's promise (1e-5) of the PyTorch model's in float64."""
    torch.manual_seed(0)
    model = crossvit_fast.create_model(name).eval()
    res = model.pretrained_cfg["input_size"][-1]
    export_onnx(model, torch.randn(2, 3, res, res), tmp_path / "model.onnx", dynamo)
    x = torch.randn(3, 3, res, res)
    with torch.no_grad():
        assert rel_err(run_onnx(tmp_path / "model.onnx", x), model.double()(x.double())) < FP32_REL_TOL


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning",
                            "ignore::FutureWarning")
@pytest.mark.parametrize("how", ["dynamic_shapes", "dynamic_axes", "dynamic_axes, dynamo=False"])
def test_onnx_export_from_a_batch_of_one_keeps_the_batch_dynamic(how, tmp_path):
    """README's call: a batch-1 example. The default exporter traces it size-oblivious; a
    reshape whose copy-or-view choice depends on the batch pinned the graph to batch 1, with
    no error, so that any other batch failed in onnxruntime."""
    torch.manual_seed(0)
    model = crossvit_fast.create_model("crossvit_tiny_240").eval()
    x1, path = torch.randn(1, 3, 240, 240), tmp_path / "model.onnx"
    if how == "dynamic_shapes":
        torch.onnx.export(model, (x1,), path, dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(model, (x1,), path, input_names=["x"], dynamic_axes={"x": {0: "batch"}},
                          **({"dynamo": False} if "dynamo=False" in how else {}))
    x = torch.randn(3, 3, 240, 240)
    with torch.no_grad():
        assert rel_err(run_onnx(path, x), model.double()(x.double())) < FP32_REL_TOL


def test_a_batch_traced_from_one_sample_stays_symbolic():
    """Traced size-oblivious from a batch of 1 (as the ONNX exporter traces), torch.compile with
    dynamic shapes makes one graph for batches 1, 2 and 3, and a strict torch.export from a batch
    of 1 runs at batch 3 (a guard from a reshape pinned both to batch 1)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = small_model().eval()
    with torch.fx.experimental._config.patch(backed_size_oblivious=True), torch.no_grad():
        compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="eager")
        for batch in (1, 2, 3):
            x = torch.randn(batch, 3, *model.img_size)
            assert torch.equal(compiled(x), model(x))
        assert counters["stats"]["unique_graphs"] == 1
        program = torch.export.export(model, (torch.randn(1, 3, *model.img_size),), strict=True,
                                      dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    x = torch.randn(3, 3, *model.img_size)
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning",
                            "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("backend", [backend_param("torch", "cpu"), backend_param("triton", "cpu")])
def test_onnx_export_on_any_backend(backend, dynamo, tmp_path):
    """The selected backend does not matter: the export is the PyTorch backend's ATen math."""
    model = small_model().eval()
    with crossvit_fast.use_backend(backend):
        export_onnx(model, torch.randn(2, 3, 48, 48), tmp_path / "model.onnx", dynamo)
    x = torch.randn(5, 3, 48, 48)
    with torch.no_grad():
        assert rel_err(run_onnx(tmp_path / "model.onnx", x), model.double()(x.double())) < FP32_REL_TOL


def key_value_macs(model) -> int:
    """MACs of the K and V projections over the tokens that timm's cross-attention makes at batch
    1: per multi-scale block and direction, 2 (N + 1) C² for the other branch's N patches."""
    tokens = [p.num_patches for p in model.patch_embed]
    macs = 0
    for _ in model.blocks:
        for d in range(len(tokens)):
            other = (d + 1) % len(tokens)
            macs += 2 * (tokens[other] + 1) * model.embed_dim[other] ** 2
    return macs


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning",
                            "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_onnx_graph_forms_no_keys_or_values_over_the_tokens(dynamo, tmp_path):
    """The exported graph does fewer multiply-accumulates than timm's own export (default
    exporter) by at least 90% of what timm's K and V projections over the tokens cost."""
    timm = import_timm()
    x = torch.randn(1, 3, 240, 240)
    ours, ref = crossvit_fast.create_model("crossvit_tiny_240").eval(), timm.create_model("crossvit_tiny_240").eval()
    torch.onnx.export(ours, (x,), tmp_path / "ours.onnx", dynamo=dynamo)
    torch.onnx.export(ref, (x,), tmp_path / "timm.onnx", dynamo=True)
    saved = product_macs(onnx.load(tmp_path / "timm.onnx")) - product_macs(onnx.load(tmp_path / "ours.onnx"))
    assert saved >= 0.9 * key_value_macs(ours), (saved, key_value_macs(ours))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning",
                            "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_onnx_export_of_a_one_branch_model(dynamo, tmp_path):
    """The one-branch configuration (its CLS over its own patches) exports and runs too."""
    from .test_one_branch import ONE_BRANCH_ARGS
    torch.manual_seed(0)
    model = crossvit_fast.CrossViT(**ONE_BRANCH_ARGS).eval()
    export_onnx(model, torch.randn(2, 3, 48, 48), tmp_path / "model.onnx", dynamo)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert rel_err(run_onnx(tmp_path / "model.onnx", x), model.double()(x.double())) < FP32_REL_TOL
