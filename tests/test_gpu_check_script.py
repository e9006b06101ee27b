"""scripts/gpu_check.sh runs through on stand-in commands: a lent GPU's minutes are not spent on a
shell error. ``python3``, ``nvidia-smi`` and ``compute-sanitizer`` are stubs that record their
command lines and return at once (or fail, where a case says so)."""
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"

STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
case "$*" in
  *"import crossvit_fast.kernels"*) exit "${STUB_IMPORT_RC:-0}";;
  *"crossvit_fast.cli build-ext"*) exit "${STUB_BUILD_RC:-0}";;
esac
exit 0
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_script(tmp_path: Path, steps: str, **env: str):
    """``(return code, summary lines, the stubs' command lines)`` of one run under ``tmp_path``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "nvidia-smi", "compute-sanitizer"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log),
                    OUT=str(tmp_path / "out"), WORK_ROOT=str(tmp_path / "work"),
                    CACHE_DIR=str(tmp_path / "cache"), DEADLINE_S="600", STEPS=steps,
                    TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    full_env.update(env)
    proc = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True,
                          timeout=120)
    archive = tmp_path / "out" / "gpu_check.tar.gz"
    assert archive.exists(), proc.stdout + proc.stderr
    with tarfile.open(archive) as tar:
        summary = tar.extractfile("gpu_check/logs/summary.log").read().decode().splitlines()
    return proc.returncode, summary, log.read_text().splitlines()


def test_every_step_of_the_prepared_calls_runs_in_order_and_is_packed(tmp_path):
    rc, summary, calls = run_script(
        tmp_path, "ext warm tests race profile_compiled sanitize_triton graphs_ab",
        TESTS_S="140", RACE_S="250")
    assert rc == 0
    phases = [line.split(":")[0].removeprefix("phase ") for line in summary if line.startswith("phase ")]
    assert phases == ["install", "build_ext", "tests", "warm", "graphs_ab", "graphs_ab_exchange",
                      "bench_race", "profile_compiled", "warm_triton", "memcheck_triton"]
    assert all(": rc=0 " in line for line in summary if line.startswith("phase ")
               and not line.startswith("phase warm:"))
    pytest_call = next(c for c in calls if "-m pytest" in c)
    # what never ran on a GPU goes first; the nvcc-only build is left to CI
    assert pytest_call.index("tests/test_compile.py") < pytest_call.index("tests/test_primitives.py")
    assert "--deselect tests/test_csrc_compile.py::test_csrc_compiles_for_sm75_sm80_and_sm90" in pytest_call
    assert sum("--warm-compile" in c for c in calls) == 6
    assert not (tmp_path / "out" / ".gpu_check.tar.gz.tmp").exists()


def test_a_failed_install_stops_the_run_and_says_why(tmp_path):
    rc, summary, calls = run_script(tmp_path, "ext tests race", STUB_IMPORT_RC="1")
    assert rc == 1
    assert any("install failed" in line for line in summary)
    assert not any("build-ext" in c or "-m pytest" in c or "bench.e2e" in c for c in calls)


@pytest.mark.parametrize("layout", ["TORCH_EXTENSIONS_DIR", "user cache"])
def test_a_failed_extension_build_leaves_no_lock_behind(tmp_path, layout):
    """Where torch builds: ``$TORCH_EXTENSIONS_DIR/<name>`` (was: looked for one level deeper),
    else ``$XDG_CACHE_HOME/torch_extensions/py<ver>_cu<ver>/<name>``."""
    if layout == "TORCH_EXTENSIONS_DIR":
        lock, env = tmp_path / "ext" / "crossvit_fast_cuda" / "lock", {}
    else:
        lock = tmp_path / "xdg" / "torch_extensions" / "py312_cu130" / "crossvit_fast_cuda" / "lock"
        env = dict(TORCH_EXTENSIONS_DIR="", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    rc, summary, _ = run_script(tmp_path, "ext", STUB_BUILD_RC="1", **env)
    assert rc == 0 and any(line.startswith("phase build_ext: rc=1 ") for line in summary)
    assert not lock.exists()
