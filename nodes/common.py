"""Input definitions shared by the pack's nodes."""
CATEGORY = "attention_edit"
LATENT_TO_IMAGE = 8  # SD1.x / SD2.x / SDXL VAEs downscale by 8

LEVELS = {"1/4 (16x16 at 512 px on SD1.x)": 2, "1/2": 1, "1/1": 0, "1/8": 3}
PARTS = {"down + up": ("input", "output"), "down + mid + up": ("input", "middle", "output"),
         "up": ("output",), "down": ("input",), "mid": ("middle",)}


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
            "Which cross-attention layers to record, by their size relative to the latent. 1/4 is "
            "the 16x16 layers of SD1.x at 512 px (32x32 on SDXL at 1024 px), the usual choice."})


def parts_input():
    return (list(PARTS), {"default": "down + up", "tooltip":
            "UNet parts whose layers at that size are averaged (official methods use down + up)."})
