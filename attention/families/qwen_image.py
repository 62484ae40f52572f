"""Qwen-Image and Qwen-Image-Edit (2509 / 2511): 60 joint blocks on [Qwen2.5-VL tokens | image
tokens | reference-image tokens]; the base Family's layout."""
from .base import Family

CLASSES = {
    "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel": Family("Qwen-Image", "transformer_blocks"),
}
