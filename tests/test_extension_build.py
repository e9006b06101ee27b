"""Building the CUDA extension where it cannot be built: each failure says what is wrong and how
to fix it, never a traceback from torch's internals or a silent wait. A CUDA build of torch with
a toolkit is emulated (``torch.version.cuda``, ``CUDA_HOME``): the failures come before nvcc."""
import fcntl
import os
import time
import warnings

import filelock
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


@pytest.fixture
def lock_file_torch(cuda_torch, monkeypatch):
    """torch < 2.14, which waits while its lock file exists (``FileBaton``)."""
    monkeypatch.delattr(cpp_extension, "FileLock", raising=False)
    return cuda_torch


@pytest.fixture
def os_lock_torch(cuda_torch, monkeypatch):
    """torch >= 2.14, which waits on an OS lock held on a file that outlives every build."""
    monkeypatch.setattr(cpp_extension, "FileLock", filelock.FileLock, raising=False)
    return cuda_torch


def _lock_file(build_root, age_s=0.0):
    lock = build_root / _extension.NAME / "lock"
    lock.parent.mkdir()
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_build_lock_is_named_not_waited_on(lock_file_torch, monkeypatch):
    """A killed build leaves torch's lock, on which every later load waited forever, silently."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    lock = _lock_file(lock_file_torch, age_s=_extension.STALE_LOCK_S + 60)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("load would wait on the lock"))
    with pytest.raises(RuntimeError, match=f"{lock} is 31 minutes old: a build of the CUDA extension was "
                                           f"killed and left it; delete it"):
        _extension.build_extension(verbose=False)
    with pytest.warns(RuntimeWarning, match="killed and left it"):
        assert str(lock) in _extension.load_extension()


def test_a_running_build_is_waited_on_with_a_warning(lock_file_torch, monkeypatch):
    """A lock younger than STALE_LOCK_S is another process's build (e.g. DDP's other ranks): wait
    on it as torch does, but say so."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    lock = _lock_file(lock_file_torch)
    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: loads.append(kw["name"]))
    with pytest.warns(RuntimeWarning, match=f"waiting for another process's build .*{lock} exists"):
        _extension.build_extension(verbose=False)
    assert loads == [_extension.NAME]


def test_an_old_lock_file_is_no_error_where_torch_holds_an_os_lock(os_lock_torch, monkeypatch):
    """From torch 2.14 every build leaves its lock file (was: RuntimeError, the CUDA backend lost,
    half an hour after any build; a warning before that)."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    _lock_file(os_lock_torch, age_s=_extension.STALE_LOCK_S + 60)
    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: loads.append(kw["name"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _extension.build_extension(verbose=False)
        assert _extension.load_extension() is None
    assert loads == [_extension.NAME] * 2


def test_a_held_os_lock_is_waited_on_with_a_warning(os_lock_torch, monkeypatch):
    """Another process's running build holds the OS lock: wait on it as torch does, but say so."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    lock = _lock_file(os_lock_torch)
    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: loads.append(kw["name"]))
    with open(lock, "a") as holder:   # flock, as filelock takes it: conflicts across open files
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        with pytest.warns(RuntimeWarning, match=f"waiting for another process.s build .*another "
                                                f"process holds the lock on {lock}"):
            _extension.build_extension(verbose=False)
    assert loads == [_extension.NAME]
