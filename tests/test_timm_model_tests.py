"""timm's own model tests (its tests/test_models.py, timm 1.0.31's source release) pass on
crossvit_fast's models as on timm's: same tests, same outcomes (passed or skipped), test by test.

Run in a subprocess with the plugin of tests/timm_model_tests.py, once building crossvit_fast's
models and once timm's. Here on two variants to stay near a minute on a CPU machine (a 240 one,
and a 408 one, which takes timm's size-limit skips), without timm's slow pruning-contract test
(which timm's own CI leaves out too: it has no marker). Every variant and that test:

    python -m pytest -p tests.timm_model_tests "$(python -m tests.timm_model_tests)" \\
        -k "crossvit and not fx and not torchscript and not load_pretrained"

(the Hub, TorchScript and FX tests are left out: no network, and crossvit_fast's models are not
scriptable or FX-traceable by design).
"""
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .timm_import import import_timm
from .timm_model_tests import timm_test_file

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("crossvit_9_240", "crossvit_15_dagger_408")
SELECTION = (f"({' or '.join(VARIANTS)}) and not fx and not torchscript and not load_pretrained "
             "and not prune_intermediate_layers_contract")


def outcomes(test_file: Path, impl: str, tmp_path: Path) -> dict:
    """``{test id: 'passed' | 'skipped' | 'failed: ...'}`` of the selection with ``impl``'s models."""
    report = tmp_path / f"{impl}.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.timm_model_tests", "-p", "no:cacheprovider",
         str(test_file), "-k", SELECTION, f"--crossvit-impl={impl}", f"--junitxml={report}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    if not report.exists():
        pytest.fail(f"timm's tests did not run ({impl}):\n{proc.stdout[-3000:]}", pytrace=False)
    if impl == "fast":
        assert "crossvit_fast models built: 0" not in proc.stdout, "the tests built no crossvit_fast model"
    results = {}
    for case in ET.parse(report).iter("testcase"):
        problem = next((c for c in case if c.tag in ("failure", "error")), None)
        skipped = next((c for c in case if c.tag == "skipped"), None)
        results[case.get("name")] = (f"failed: {problem.get('message', '')[:300]}" if problem is not None
                                     else "skipped" if skipped is not None else "passed")
    return results


def test_timms_model_tests_pass_on_our_models_as_on_timms(tmp_path):
    import_timm()
    try:
        test_file = timm_test_file()
    except RuntimeError as err:
        pytest.skip(str(err))
    ours, theirs = outcomes(test_file, "fast", tmp_path), outcomes(test_file, "timm", tmp_path)
    assert theirs and all(v in ("passed", "skipped") for v in theirs.values()), theirs
    assert ours == theirs
    assert sum(v == "passed" for v in ours.values()) >= 5     # the 240 variant: all five ran
