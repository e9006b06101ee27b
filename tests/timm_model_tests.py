"""Run timm's own model tests (``tests/test_models.py`` of timm's source release) on crossvit_fast.

timm's wheel does not ship its tests; its source release on the package index does. This module
finds that file for the installed timm version (``CROSSVIT_FAST_TIMM_TESTS`` if set, else a copy
cached under ``~/.cache/crossvit_fast``, fetched once with ``pip download``), and is also the
pytest plugin (``-p tests.timm_model_tests``) that runs it: torchvision imports answered by the
stand-in of tests/timm_import.py, and, with ``--crossvit-impl fast`` (the default), the test
module's ``create_model`` building crossvit_fast's model for every CrossViT name (any other
name stays timm's). ``--crossvit-impl timm`` runs the same selection on timm's own CrossVit.

The suite runs a selection of it (tests/test_timm_model_tests.py); every CrossViT variant, from
the repository root:

    python -m pytest -p tests.timm_model_tests "$(python -m tests.timm_model_tests)" \\
        -k "crossvit and not fx and not torchscript and not load_pretrained"
"""
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crossvit_fast"
ENV_VAR = "CROSSVIT_FAST_TIMM_TESTS"
# timm's tests/test_models.py needs no other file of timm's tests/.
MEMBER = "tests/test_models.py"


def timm_test_file() -> Path:
    """timm's ``tests/test_models.py`` for the installed timm; RuntimeError saying why not."""
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR])
        if not path.is_file():
            raise RuntimeError(f"{ENV_VAR}={path}: no such file")
        return path
    version = metadata.version("timm")
    path = CACHE / f"timm-{version}" / MEMBER
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                               "--no-deps", "--quiet", f"timm=={version}", "-d", tmp],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise RuntimeError(f"could not download timm {version}'s source release (pip download "
                               f"--no-binary :all: --no-deps timm=={version}): {proc.stdout[-500:]}")
        with tarfile.open(sdists[0]) as tar:
            member = tar.getmember(f"timm-{version}/{MEMBER}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(member).read())
    return path


# ---- the pytest plugin ----------------------------------------------------------------------

_built = []   # names of the crossvit_fast models the routed create_model built


def pytest_addoption(parser):
    parser.addoption("--crossvit-impl", choices=("fast", "timm"), default="fast",
                     help="whose CrossViT timm's model tests build: crossvit_fast's or timm's")


def pytest_configure(config):
    from .timm_import import install_torchvision_stand_in
    install_torchvision_stand_in()
    for marker in ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features",
                   "fxforward", "fxbackward", "timeout(seconds)"):
        config.addinivalue_line("markers", marker)


@pytest.fixture(autouse=True)
def _crossvit_fast_models(request, monkeypatch):
    """timm's create_model in the test module, with CrossViT names built by crossvit_fast."""
    module = request.module
    if request.config.getoption("--crossvit-impl") != "fast" or not hasattr(module, "create_model"):
        return
    import crossvit_fast
    timm_create_model = module.create_model
    ours = set(crossvit_fast.list_models())

    def create_model(model_name, *args, **kwargs):
        if model_name.partition(".")[0] not in ours:
            return timm_create_model(model_name, *args, **kwargs)
        _built.append(model_name)
        return crossvit_fast.create_model(model_name, *args, **kwargs)
    monkeypatch.setattr(module, "create_model", create_model)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"crossvit_fast models built: {len(_built)}")


if __name__ == "__main__":
    print(timm_test_file())
