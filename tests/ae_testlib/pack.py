"""Import the pack under the name `attention_edit` without running its root __init__.

ComfyUI loads the repository root as a package named after its folder. Tests (and the golden
check scripts) register the same folder as the package `attention_edit` with an empty module, so
pure-tensor code (masks/) can be imported without ComfyUI; modules that need ComfyUI import it
themselves.
"""
import importlib
import pathlib
import sys
import types

PACK_ROOT = pathlib.Path(__file__).resolve().parents[2]
PACK_NAME = "attention_edit"


def register_pack():
    if PACK_NAME not in sys.modules:
        package = types.ModuleType(PACK_NAME)
        package.__path__ = [str(PACK_ROOT)]
        package.__file__ = str(PACK_ROOT / "__init__.py")
        sys.modules[PACK_NAME] = package
    return sys.modules[PACK_NAME]


def pack_module(name):
    """pack_module("masks.instdiffedit") -> the module attention_edit.masks.instdiffedit."""
    register_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")
