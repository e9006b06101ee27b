"""Building the CUDA extension where it cannot be built: each failure says what is wrong and how
to fix it, never a traceback from torch's internals or a silent wait. A CUDA build of torch with
a toolkit is emulated (``torch.version.cuda``, ``CUDA_HOME``): the failures come before nvcc."""
import os
import time

import pytest
import torch
from torch.utils import cpp_extension

from crossvit_fast import _extension, cli


@pytest.fixture
def cuda_torch(monkeypatch, tmp_path):
    """A CUDA torch with a toolkit and no visible GPU, building into ``tmp_path``."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    _extension.load_extension.cache_clear()
    yield tmp_path
    _extension.load_extension.cache_clear()


def test_no_visible_gpu_asks_for_the_architectures(cuda_torch, capsys):
    """A container's build step (was: IndexError from torch's arch flags, with a traceback)."""
    with pytest.raises(RuntimeError, match="no visible GPU to build the CUDA extension for: set "
                                           "TORCH_CUDA_ARCH_LIST"):
        _extension.build_extension(verbose=False)
    assert cli.main(["build-ext"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "TORCH_CUDA_ARCH_LIST='8.0;8.6;9.0'" in err
    with pytest.warns(RuntimeWarning, match="no visible GPU"):
        assert "TORCH_CUDA_ARCH_LIST" in _extension.load_extension()


def test_a_bad_architecture_list_is_named(cuda_torch, monkeypatch, capsys):
    """torch's ValueError (was: a traceback from build-ext) names the variable and the form."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm_80")
    with pytest.raises(RuntimeError, match=r"TORCH_CUDA_ARCH_LIST='sm_80': .*sm_80.*; expected "
                                           r"compute capabilities separated by ';', e\.g\. '8\.0;9\.0\+PTX'"):
        _extension.build_extension(verbose=False)
    assert cli.main(["build-ext"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_stale_build_lock_is_named_not_waited_on(cuda_torch, monkeypatch):
    """A killed build leaves torch's lock, on which every later load waited forever, silently."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    lock = cuda_torch / _extension.NAME / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - _extension.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("load would wait on the lock"))
    with pytest.raises(RuntimeError, match=f"{lock} is 31 minutes old: a build of the CUDA extension was "
                                           f"killed and left it; delete it"):
        _extension.build_extension(verbose=False)
    with pytest.warns(RuntimeWarning, match="killed and left it"):
        assert str(lock) in _extension.load_extension()


def test_a_running_build_is_waited_on_with_a_warning(cuda_torch, monkeypatch):
    """A lock younger than STALE_LOCK_S is another process's build (e.g. DDP's other ranks): wait
    on it as torch does, but say so."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    lock = cuda_torch / _extension.NAME / "lock"
    lock.parent.mkdir()
    lock.touch()
    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: loads.append(kw["name"]))
    with pytest.warns(RuntimeWarning, match=f"waiting for another process's build .*{lock} exists"):
        _extension.build_extension(verbose=False)
    assert loads == [_extension.NAME]
