"""Import timm for parity tests, on machines without torchvision too.

timm imports torchvision at module load for pieces CrossViT never uses (FrozenBatchNorm2d, image
transforms). Where torchvision is missing (the CPU CI machine: there is no CPU torchvision build
here), a stand-in module answers those imports with inert placeholder classes so that timm's real
``crossvit.py`` can be imported and run. Where torchvision is installed, it is used as is.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


class _Placeholder(type):
    """A class whose every attribute is another placeholder class (enum members included)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def install_torchvision_stand_in() -> None:
    """Where torchvision is not installed, answer its imports with the stand-in (once)."""
    if importlib.util.find_spec("torchvision") is None and not any(
            isinstance(f, _TorchvisionStandIn) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionStandIn())


def import_timm():
    """timm, or a pytest skip saying why it cannot be imported here."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm==1.0.31 pillow pyyaml)")
    install_torchvision_stand_in()
    import timm
    return timm
