"""Input definitions shared by the pack's nodes."""
CATEGORY = "attention_edit"
LATENT_TO_IMAGE = 8  # SD1.x / SD2.x / SDXL VAEs downscale by 8

LEVELS = {"1/4 (16x16 at 512 px on SD1.x)": 2, "1/2": 1, "1/1": 0, "1/8": 3}
# DiT models (Flux, SD3, Qwen-Image): which joint-attention row is recorded (docs/recording.md)
NORMALISATIONS = {"text keys only": "text", "joint (all keys)": "joint"}
PARTS = {"down + up": ("input", "output"), "down + mid + up": ("input", "middle", "output"),
         "up": ("output",), "down": ("input",), "mid": ("middle",)}


def choice(options, value, input_name):
    """options[value] for a COMBO input; the UI only offers valid values, Python and API callers
    get an error naming the input and its choices."""
    if value not in options:
        raise ValueError(f"'{input_name}' must be one of {list(options)}, got {value!r}")
    return options[value]


def sampler_inputs():
    """KSampler's own inputs (same names, same choices)."""
    import comfy.samplers

    return {
        "model": ("MODEL",),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
        "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
        "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",),
        "latent_image": ("LATENT",),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
    }


def resolution_input():
    return (list(LEVELS), {"default": next(iter(LEVELS)), "tooltip":
            "UNet models: which cross-attention layers to record, by their size relative to the latent. "
            "1/4 is the 16x16 layers of SD1.x at 512 px (32x32 on SDXL at 1024 px), the usual choice. "
            "DiT models attend at one size (latent / 2) and use dit_blocks instead."})


def parts_input():
    return (list(PARTS), {"default": "down + up", "tooltip":
            "UNet parts whose layers at that size are averaged (official methods use down + up). "
            "DiT models use dit_blocks instead."})


def branch_input():
    return (["cond", "uncond"], {"default": "cond", "tooltip":
            "Record the positive (cond) or negative (uncond) prompt's attention."})


def dit_blocks_input():
    return ("STRING", {"default": "", "tooltip":
            "DiT models only (Flux, Flux.2, Chroma, SD3, Qwen-Image, Z-Image, HunyuanImage, Wan): which blocks to "
            "record. Empty: the late double/joint blocks (Flux 15-18 of 19, Flux.2 [dev] 6-7 of 8, SD3 19-22 of "
            "24, Qwen-Image 47-57 of 60, Z-Image 24-28 of 30, HunyuanImage 16-19 of 20, Wan 24-28 of 30 / 32-38 "
            "of 40). Else e.g. "
            "'15-18', 'double 3, single 0-9', 'all'. UNet models use resolution and layers instead."})


def normalisation_input():
    return (list(NORMALISATIONS), {"default": next(iter(NORMALISATIONS)), "tooltip":
            "DiT models only: 'text keys only' renormalises each pixel's attention over the prompt's "
            "tokens (like UNet cross-attention; sharper word masks); 'joint (all keys)' keeps the "
            "model's own probability, normalised over text and image keys."})
