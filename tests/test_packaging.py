"""What an install brings: no Triton on a CPU-only install, and the package works without it."""
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11's tomllib reads pyproject.toml")

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_a_plain_install_downloads_no_triton():
    """A CPU-only machine cannot run Triton (about 1 GB); a CUDA build of torch brings the
    Triton it was built with. Only the tests' extra asks for it (its CPU interpreter)."""
    project = pyproject()["project"]
    assert not any(dep.lower().startswith("triton") for dep in project["dependencies"])
    assert any(dep.startswith("triton") for dep in project["optional-dependencies"]["test"])


def test_the_torch_floor_is_the_oldest_torch_ci_checks():
    """pyproject's torch floor is the torch of .ci/run's oldest job (the compile tests)."""
    floor = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert floor == "torch>=2.11" and "torch==2.11.0" in ci


def test_without_triton_the_model_runs_on_the_pytorch_backend():
    """With Triton not importable, the package imports, the model runs on the CPU, and the
    Triton backend says why it is unavailable."""
    code = "\n".join([
        "import sys",
        "sys.modules['triton'] = None   # as if not installed",
        "import torch, crossvit_fast",
        "from crossvit_fast import backends",
        "from tests.test_model import small_model",
        "print(small_model().eval()(torch.randn(1, 3, 48, 48)).shape)",
        "print(backends.unavailable_reason('triton', 'cpu'))",
    ])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    shape, reason = out.stdout.strip().splitlines()[-2:]
    assert shape == "torch.Size([1, 10])" and "not installed" in reason
