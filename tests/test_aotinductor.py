"""torch.export → AOTInductor package → loaded in this process and in a new one (README's recipe)."""
import subprocess
import sys

import pytest
import torch

from .numerics import FP32_REL_TOL, rel_err
from .test_model import small_model


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torch_export_compiles_with_aotinductor_and_matches(tmp_path):
    """torch.export → aoti_compile_and_package → aoti_load_package (README's recipe), with a
    dynamic batch: the package's logits are the model's. The exported program keeps the
    crossvit_fast::attn_pool op, which the package calls back (import crossvit_fast.ops first
    in a new process)."""
    torch.manual_seed(0)
    model = small_model().eval()
    program = torch.export.export(model, (torch.randn(2, 3, 48, 48),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        want = model.double()(x.double())
        assert rel_err(compiled(x), want) < FP32_REL_TOL
    # README's recipe in a new process: import crossvit_fast.ops, then load the package
    torch.save((x, want), tmp_path / "io.pt")
    code = (f"import torch, crossvit_fast.ops\nd = {str(tmp_path)!r}\nx, want = torch.load(d + '/io.pt')\n"
            f"got = torch._inductor.aoti_load_package({path!r})(x)\n"
            "print(((got - want).abs().max() / want.abs().max()).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split()[-1]) < FP32_REL_TOL
