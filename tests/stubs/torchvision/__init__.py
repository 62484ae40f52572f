"""Minimal stand-in for torchvision, used only by the tests.

PyPI's torchvision wheels are CUDA builds that fail to import next to the CPU torch used here.
ComfyUI imports torchvision at module level (in comfy.model_patcher and the ACE VAE), but Stable
Diffusion code paths never call it. Every submodule
imports; calling anything in it is an error.
"""
import importlib.abc
import importlib.machinery
import sys
import types


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision stub: {self._name} is not available in the test host")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubFinder())
sys.modules[__name__].__class__ = _StubModule
__version__ = "0.0.0+stub"
