"""ComfyUI's node registry: core nodes, and the pack loaded as a custom node."""
import asyncio
import functools
import inspect

from . import host
from .pack import PACK_ROOT

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


def _run(result):
    return asyncio.run(result) if inspect.isawaitable(result) else result


@functools.lru_cache(maxsize=None)
def core_nodes():
    """name -> class for ComfyUI's own nodes (nodes.py and comfy_extras)."""
    host.import_host()
    import nodes

    _run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return dict(nodes.NODE_CLASS_MAPPINGS)


@functools.lru_cache(maxsize=None)
def pack_nodes():
    """Load the repository root the way ComfyUI loads a custom-node folder; its NODE_CLASS_MAPPINGS."""
    host.import_host()
    import nodes

    before = set(nodes.NODE_CLASS_MAPPINGS)
    assert _run(nodes.load_custom_node(str(PACK_ROOT))), "ComfyUI failed to load the pack"
    loaded = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k not in before}
    return loaded, dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
