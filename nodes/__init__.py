"""The pack's ComfyUI nodes (classic V1 node API)."""
from . import encode, foi, instdiffedit, inversion, magedit, record

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (encode, record, inversion, instdiffedit, foi, magedit):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
