"""Flux.1 (dev, schnell, Kontext) and Chroma: 19 double blocks, then 38 single blocks, on
[T5 tokens | image tokens | Kontext's reference tokens]; the base Family's joint layout."""
from .base import Family

CLASSES = {
    "comfy.ldm.flux.model.Flux": Family("Flux", "double_blocks", "single_blocks"),
    "comfy.ldm.chroma.model.Chroma": Family("Chroma", "double_blocks", "single_blocks"),
}
