"""ComfyUI's node registry in both hosts: core nodes, and the pack loaded as a custom node."""
import asyncio
import functools
import importlib
import importlib.util
import inspect
import pkgutil
import sys

from . import host
from .pack import PACK_ROOT

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


def _run(result):
    return asyncio.run(result) if inspect.isawaitable(result) else result


@functools.lru_cache(maxsize=None)
def core_nodes():
    """name -> class for ComfyUI's own nodes (nodes.py and comfy_extras)."""
    host.import_host()
    try:
        import nodes  # upstream ComfyUI
    except ImportError:
        nodes = None
    if nodes is not None and hasattr(nodes, "init_extra_nodes"):
        _run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        return dict(nodes.NODE_CLASS_MAPPINGS)
    from comfy.nodes import base_nodes  # the PyPI snapshot's layout
    import comfy_extras.nodes as extras

    mapping = dict(base_nodes.NODE_CLASS_MAPPINGS)
    for info in pkgutil.iter_modules(extras.__path__):
        try:
            module = importlib.import_module(f"comfy_extras.nodes.{info.name}")
        except Exception:  # an optional dependency missing: that module's nodes are not used here
            continue
        mapping.update(getattr(module, "NODE_CLASS_MAPPINGS", {}) or {})
    return mapping


@functools.lru_cache(maxsize=None)
def pack_nodes():
    """Load the repository root the way ComfyUI loads a custom-node folder; its NODE_CLASS_MAPPINGS."""
    host.import_host()
    try:
        import nodes
    except ImportError:
        nodes = None
    if nodes is not None and hasattr(nodes, "load_custom_node"):
        before = set(nodes.NODE_CLASS_MAPPINGS)
        assert _run(nodes.load_custom_node(str(PACK_ROOT))), "ComfyUI failed to load the pack"
        loaded = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k not in before}
        return loaded, dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    name = PACK_ROOT.name.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return dict(module.NODE_CLASS_MAPPINGS), dict(module.NODE_DISPLAY_NAME_MAPPINGS)
