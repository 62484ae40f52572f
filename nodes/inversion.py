"""Inversion node: DDIM inversion with optional null-text optimisation -> INVERSION (MAG-Edit)."""
import comfy.utils

from ..samplers import inversion


class InversionNode:
    DESCRIPTION = ("Inverts a source latent into noise with DDIM under its source prompt and, with "
                   "null-text, optimises one unconditional embedding per step so CFG sampling "
                   "retraces the image (MAG-Edit's reconstruction branch).")
    RETURN_TYPES = ("INVERSION", "LATENT")
    RETURN_NAMES = ("inversion", "noise")
    OUTPUT_TOOLTIPS = ("Trajectory, per-step null embeddings, schedule and model fingerprint, for "
                       "MAG-Edit.",
                       "The inverted noise z_T; a KSampler with add_noise disabled starts from it.")
    FUNCTION = "invert"
    CATEGORY = "attention_edit/mag_edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model MAG-Edit will sample with (same LoRAs)."}),
            "positive": ("CONDITIONING", {"tooltip": "The source prompt: describes the image as it is."}),
            "negative": ("CONDITIONING", {"tooltip": "Unconditional prompt, usually empty; null-text "
                                                     "optimises its text embedding per step."}),
            "latent": ("LATENT", {"tooltip": "The encoded source image."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                              "tooltip": "DDIM steps (official 50); MAG-Edit must use the same."}),
            "null_text": ("BOOLEAN", {"default": True,
                                      "tooltip": "Null-text optimisation: faithful reconstruction at "
                                                 "CFG; costs up to inner_iterations forward and "
                                                 "backward passes per step."}),
            "inner_iterations": ("INT", {"default": 10, "min": 1, "max": 100,
                                         "tooltip": "Adam iterations per step (official 10)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "The CFG the null embeddings are optimised for (official "
                                         "7.5); use the same in MAG-Edit."}),
        }}

    def invert(self, model, positive, negative, latent, steps, null_text, inner_iterations, cfg):
        progress = comfy.utils.ProgressBar(steps)
        result, noise = inversion.invert(
            model, positive, negative, latent["samples"], steps=steps, null_text=null_text,
            inner_iterations=inner_iterations, cfg=cfg,
            progress=lambda done, total: progress.update_absolute(done, total))
        return (result, {"samples": noise})


NODE_CLASS_MAPPINGS = {"AttentionEditInversion": InversionNode}
NODE_DISPLAY_NAME_MAPPINGS = {"AttentionEditInversion": "Inversion (DDIM / Null-text)"}
