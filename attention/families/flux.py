"""Flux.1 (dev, schnell, Kontext) and Chroma: 19 double blocks, then 38 single blocks, on
[T5 tokens | image tokens | Kontext's reference tokens]; the base Family's joint layout."""
from .base import Family

# Chroma's T5 prompt ends in a single </s> (no padding): that one token's map is too noisy a start
# map (docs/instdiffedit.md measures it), so InstDiffEdit refuses Chroma rather than guess a mask.
CHROMA_START = ("its T5 prompt has a single end token and no padding, which gives no reliable start map "
                "(docs/instdiffedit.md, 'DiT models')")

CLASSES = {
    "comfy.ldm.flux.model.Flux": Family("Flux", "double_blocks", "single_blocks", padded_prompt=True),  # T5 to 256
    "comfy.ldm.chroma.model.Chroma": Family("Chroma", "double_blocks", "single_blocks",
                                            refusals=(("InstDiffEdit", CHROMA_START),)),
}
