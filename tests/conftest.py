"""Test session set-up.

On a machine without CUDA, Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1``
must be set before Triton is first imported, so it is set here, before any test module loads.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from crossvit_fast import backends, layers  # noqa: E402  (after TRITON_INTERPRET is set)

from crossvit_fast.backends import triton_backend  # noqa: E402

if not torch.cuda.is_available() and triton_backend.triton is not None:
    # every Triton test would fail inside the interpreter: one line saying why instead
    _conflict = triton_backend.interpreter_numpy_conflict()
    if _conflict:
        raise pytest.UsageError(f"the Triton kernels cannot be tested here: {_conflict}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_param(name: str, device: str = DEVICE):
    """A pytest param for backend ``name`` that skips, with the reason, where it cannot run on
    ``device`` (a test on CPU tensors passes "cpu": on a GPU machine Triton has no interpreter)."""
    reason = backends.unavailable_reason(name, device)
    return pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


ALL_BACKENDS = [backend_param(name) for name in backends.CONCRETE_BACKENDS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The library's own threshold, read before any test patches it.
LIBRARY_FUSED_NORM_MIN_ELEMENTS = layers.FUSED_NORM_MIN_ELEMENTS


@pytest.fixture(autouse=True)
def _always_fuse_norms(monkeypatch):
    """The tests' small models run the fused norms too (by default those sizes take ATen's)."""
    monkeypatch.setattr(layers, "FUSED_NORM_MIN_ELEMENTS", 0)


@pytest.fixture(params=[False, True], ids=["cls_proj_modules", "cls_proj_fused"])
def fused_cls_projection(request, monkeypatch):
    """Runs a test with the CLS projections as timm's modules (the default) and as the fused op."""
    monkeypatch.setattr(layers, "FUSED_CLS_PROJECTION", request.param)
    return request.param


@pytest.fixture(params=["norms_fused", "norms_library_default"])
def norm_threshold(request, monkeypatch):
    """Runs a test with every block norm fused (the tests' default) and with the library's size
    threshold (at test sizes: ATen's add and LayerNorm)."""
    if request.param == "norms_library_default":
        monkeypatch.setattr(layers, "FUSED_NORM_MIN_ELEMENTS", LIBRARY_FUSED_NORM_MIN_ELEMENTS)
    return request.param


TIMM_INSTALL = "pip install --no-deps timm==1.0.31 pillow pyyaml"
PARITY_TESTS = "test_timm_parity.py"


def pytest_terminal_summary(terminalreporter):
    """One line saying whether the comparison with timm ran: it needs timm, which the test extra
    cannot install (timm requires torchvision), so a run without it must say so, not just pass."""
    line = timm_parity_line(terminalreporter.stats)
    if line:
        terminalreporter.write_line(line)


def timm_parity_line(stats: dict) -> str:
    """``timm parity: ran ...`` or ``timm parity: SKIPPED ...`` from a run's reports, or "" where
    no parity test was collected."""
    counts = {outcome: sum(PARITY_TESTS in getattr(r, "nodeid", "") for r in stats.get(outcome, []))
              for outcome in ("passed", "failed", "error", "skipped")}
    if not any(counts.values()):
        return ""
    if counts["passed"] + counts["failed"] + counts["error"] == 0:
        return (f"timm parity: SKIPPED: timm is not installed ({counts['skipped']} skipped); "
                f"for the comparison with timm: {TIMM_INSTALL}")
    import importlib.metadata
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n)
    return f"timm parity: ran against timm {importlib.metadata.version('timm')}: {summary}"
