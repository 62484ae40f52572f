"""Word <-> token positions for every text encoder the pack supports: one reader per encoder
(clip: SD1.x / SD2.x / SDXL; t5: Flux, Kontext, Chroma, Wan's umT5; sd3; qwen25vl: Qwen-Image
(-Edit); tekken: Flux.2 [dev]'s Mistral; qwen3: Z-Image, Flux.2 [klein];
hunyuan_image: HunyuanImage 2.1's Qwen2.5-VL + byT5), found by the ComfyUI
tokenizer's parts (and, where encoders share a part name, its class). Positions index the
conditioning's token axis, which is the text keys of the model's attention in order. docs/text_encoders.md describes each.
"""
from .clip import CLIP_PARTS, clip_prompt_tokens
from .hunyuan_image import HUNYUAN_IMAGE
from .mapping import UnsupportedEncoderError, tokenizer_parts
from .qwen25vl import QWEN_IMAGE
from .qwen3 import KLEIN, KLEIN_8B, Z_IMAGE
from .sd3 import SD3
from .t5 import CHROMA, FLUX, WAN
from .tekken import TEKKEN

# family -> Encoder
ENCODERS = {"flux": FLUX, "sd3": SD3, "chroma": CHROMA, "qwen_image": QWEN_IMAGE, "wan": WAN, "flux2": TEKKEN,
            "z_image": Z_IMAGE, "flux2_klein": KLEIN, "flux2_klein_8b": KLEIN_8B, "hunyuan_image": HUNYUAN_IMAGE}


def encoder_family(clip):
    """A key of ENCODERS ('flux', 'sd3', 'qwen_image', 'z_image', ...); None for the CLIP encoders
    of SD1.x/SD2.x/SDXL. Feature-detected from the tokenizer's parts."""
    tokenizer = clip.tokenizer
    parts = tokenizer_parts(tokenizer)
    if parts and parts <= CLIP_PARTS:
        return None
    for family, encoder in ENCODERS.items():
        if encoder.matches(tokenizer):
            return family
    supported = ["SD1.x / SD2.x / SDXL (CLIP)"] + [encoder.name for encoder in ENCODERS.values()]
    raise UnsupportedEncoderError(
        f"attention-edit cannot map words for this text encoder ({type(tokenizer).__name__} with "
        f"{', '.join(sorted(parts)) or 'no known'} parts). Supported text encoders: {'; '.join(supported)}.")


def prompt_tokens(clip, text):
    """Tokenise `text` with the CLIP object's tokenizer and map each word to its token positions."""
    family = encoder_family(clip)
    if family is None:
        return clip_prompt_tokens(clip, text)
    return ENCODERS[family].prompt_tokens(clip, text)
