"""The DiT families the pack reads attention on: one adapter module per family (flux, flux2,
sd3, qwen_image, hunyuan_image, wan, z_image), each listing the diffusion-model classes it handles in CLASSES; this
module finds a model's family and refuses the rest with a clear message.
"""
from . import flux, flux2, hunyuan_image, qwen_image, sd3, wan, z_image
from .base import PATCH, Family, Layout, layout_of, token_grid  # noqa: F401  (the package's interface)
from .blocks import default_blocks, parse_blocks  # noqa: F401


def _candidates(*modules):
    """The diffusion_model's exact class -> the families that run in it, tried in order
    (Family.accepts tells them apart by structure: Flux.1 and Flux.2 share Flux's class). Exact,
    not isinstance: subclasses with another token layout exist (Chroma Radiance patchifies pixels
    16x16), and AuraFlow's class is also "MMDiT"."""
    found = {}
    for module in modules:
        for name, family in module.CLASSES.items():
            found.setdefault(name, []).append(family)
    return found


CANDIDATES = _candidates(flux, sd3, qwen_image, wan, flux2, z_image, hunyuan_image)  # a new family: its module here
FAMILIES = {name: found[0] for name, found in CANDIDATES.items()}  # each class's first family
BY_NAME = {family.name: family for found in CANDIDATES.values() for family in found}  # maps name their family
SUPPORTED = ("Flux (dev, schnell, Kontext), Flux.2 (dev, Klein), Chroma, SD3 / SD3.5, Qwen-Image (incl. Edit), "
             "Z-Image (Turbo), HunyuanImage 2.1 and Wan 2.1 / 2.2 video")


def family_of(model_patcher):
    """The Family of a ModelPatcher's diffusion model, or None for a UNet / unknown model."""
    diffusion_model = model_patcher.model.diffusion_model
    kind = type(diffusion_model)
    for family in CANDIDATES.get(f"{kind.__module__}.{kind.__qualname__}", ()):
        if family.accepts(model_patcher):
            return family
    return None  # a known class with another token layout (patch size) or model, or an unknown model


# The oldest ComfyUI tested with DiT models (CI runs 0.3.64 and 0.19.3, README "Supported ComfyUI").
OLDEST_DIT_HOST = "0.3.64"


def require_family(model_patcher):
    family = family_of(model_patcher)
    if family is None:
        diffusion_model = model_patcher.model.diffusion_model
        kind = type(diffusion_model)
        candidates = CANDIDATES.get(f"{kind.__module__}.{kind.__qualname__}", ())
        refusals = [why for why in (c.refusal(diffusion_model) for c in candidates) if why]
        if refusals:  # family_of saw another model in a family's class (Lumina 2.0 in Z-Image's, HunyuanVideo)
            raise TypeError(f"attention recording, InstDiffEdit and FoI do not support this model: {refusals[0]}. "
                            f"They support SD1.x, SD2.x and SDXL UNets and the DiT models {SUPPORTED}.")
        if candidates:  # family_of saw another token layout
            patches = sorted({str(f.patch) for f in candidates})
            raise TypeError(
                "attention recording, InstDiffEdit and FoI do not support this model yet: a model in "
                f"{kind.__name__}'s class with patch size {diffusion_model.patch_size} (the pack reads "
                f"patch {' / '.join(patches)} token grids there). They support SD1.x, SD2.x and SDXL UNets "
                f"and the DiT models {SUPPORTED}.")
        raise TypeError(
            f"attention recording, InstDiffEdit and FoI do not support this model ({kind.__name__}); they support SD1.x, SD2.x and "
            f"SDXL UNets and the DiT models {SUPPORTED}."
        )
    require_attention_override()
    return family


def dit_family(model_patcher):
    """None for a UNet (SD1.x, SD2.x, SDXL), the Family of a supported DiT, a clear error for any
    other model: what the methods branch on."""
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
