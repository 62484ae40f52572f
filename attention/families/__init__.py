"""The DiT families the pack reads attention on: one adapter module per family (flux, sd3,
qwen_image, hunyuan_image, wan), each listing the diffusion-model classes it handles in CLASSES; this module
finds a model's family and refuses the rest with a clear message.
"""
from . import flux, hunyuan_image, qwen_image, sd3, wan
from .base import PATCH, Family, Layout, layout_of, token_grid  # noqa: F401  (the package's interface)
from .blocks import default_blocks, parse_blocks  # noqa: F401

# the diffusion_model's exact class -> family. Exact, not isinstance: subclasses with another
# token layout exist (Chroma Radiance patchifies pixels 16x16), and AuraFlow's class is also "MMDiT".
FAMILIES = {**flux.CLASSES, **sd3.CLASSES, **qwen_image.CLASSES, **wan.CLASSES, **hunyuan_image.CLASSES}
SUPPORTED = ("Flux (dev, schnell, Kontext), Chroma, SD3 / SD3.5, Qwen-Image (incl. Edit), HunyuanImage 2.1 "
             "and Wan 2.1 / 2.2 video")


def family_of(model_patcher):
    """The Family of a ModelPatcher's diffusion model, or None for a UNet / unknown model."""
    diffusion_model = model_patcher.model.diffusion_model
    kind = type(diffusion_model)
    family = FAMILIES.get(f"{kind.__module__}.{kind.__qualname__}")
    if family is not None and _as_tuple(getattr(diffusion_model, "patch_size", family.patch)) != _as_tuple(family.patch):
        return None  # another token layout in a known class: Flux.2 (0.3.72+) runs in Flux's class, patch 1
    return family


def _as_tuple(patch):
    return tuple(patch) if isinstance(patch, (tuple, list)) else (patch,)


# The oldest ComfyUI tested with DiT models (CI runs 0.3.64 and 0.19.3, README "Supported ComfyUI").
OLDEST_DIT_HOST = "0.3.64"


def require_family(model_patcher):
    family = family_of(model_patcher)
    if family is None:
        diffusion_model = model_patcher.model.diffusion_model
        kind = type(diffusion_model)
        if f"{kind.__module__}.{kind.__qualname__}" in FAMILIES:  # family_of saw another token layout
            raise TypeError(
                "attention recording, InstDiffEdit and FoI do not support this model yet: "
                f"{FAMILIES[f'{kind.__module__}.{kind.__qualname__}'].other_layout(diffusion_model)}. They "
                f"support SD1.x, SD2.x and SDXL UNets and the DiT models {SUPPORTED}.")
        raise TypeError(
            f"attention recording, InstDiffEdit and FoI do not support this model ({kind.__name__}); they support SD1.x, SD2.x and "
            f"SDXL UNets and the DiT models {SUPPORTED}."
        )
    require_attention_override()
    return family


def dit_family(model_patcher):
    """None for a UNet (SD1.x, SD2.x, SDXL), the Family of a supported DiT, a clear error for any
    other model (Flux.2 included): what the methods branch on."""
    if hasattr(model_patcher.model.diffusion_model, "input_blocks"):
        return None
    return require_family(model_patcher)


def require_attention_override():
    """Every DiT capture goes through transformer_options["optimized_attention_override"]
    (ComfyUI 0.3.60+, in wrap_attn). An older ComfyUI never calls it: without this check its maps
    would come back empty, without an error."""
    import comfy.ldm.modules.attention as attention

    if not hasattr(attention, "wrap_attn"):
        raise RuntimeError(
            f"attention-edit on DiT models ({SUPPORTED}) needs ComfyUI {OLDEST_DIT_HOST} or newer: this "
            "ComfyUI has no attention override hook (transformer_options['optimized_attention_override'], "
            "added in 0.3.60). Update ComfyUI (git pull, or Manager > Update ComfyUI); SD1.x, SD2.x and "
            "SDXL models work on this version."
        )
