"""attention-edit: training-free, attention-mask image editing nodes for ComfyUI."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Served by ComfyUI under /extensions/<this folder's name>/; the frontend shows
# docs/<node class>.md from it as the node's help page. Holds no JavaScript.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
