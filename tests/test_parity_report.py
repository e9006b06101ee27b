"""The test run's last line says whether the comparison with timm ran (tests/conftest.py)."""
import subprocess
import sys
from pathlib import Path

from .conftest import TIMM_INSTALL, timm_parity_line
from .timm_import import import_timm

ROOT = Path(__file__).resolve().parent.parent
QUICK_PARITY_TEST = "tests/test_timm_parity.py::test_timm_defaults_match"


def run_pytest(*, hide_timm: bool) -> str:
    """The output of ``pytest -q`` on one quick parity test, in a fresh process, with timm hidden
    (as if not installed) or not."""
    hide = "sys.modules['timm'] = None; " if hide_timm else ""
    code = f"import sys, pytest; {hide}sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {QUICK_PARITY_TEST!r}]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return out.stdout


def test_a_run_without_timm_says_parity_was_skipped_and_how_to_run_it():
    lines = run_pytest(hide_timm=True).splitlines()
    assert ("timm parity: SKIPPED: timm is not installed (1 skipped); for the comparison with timm: "
            f"{TIMM_INSTALL}") in lines, lines


def test_a_run_with_timm_says_parity_ran():
    import_timm()   # skips where timm is not installed
    lines = run_pytest(hide_timm=False).splitlines()
    assert any(line.startswith("timm parity: ran against timm ") and line.endswith(": 1 passed")
               for line in lines), lines


class Report:
    def __init__(self, nodeid):
        self.nodeid = nodeid


def test_the_line_counts_parity_tests_only_and_is_absent_without_them():
    stats = {"passed": [Report("tests/test_ops.py::a")], "skipped": [Report("tests/test_model.py::b")]}
    assert timm_parity_line(stats) == ""
    stats["skipped"].append(Report("tests/test_timm_parity.py::c"))
    assert timm_parity_line(stats).startswith("timm parity: SKIPPED: timm is not installed (1 skipped)")
