"""MAG-Edit node: mask-guided latent optimisation with P2P injection on an INVERSION."""
import comfy.utils
import torch

from ..masks.attention_mask import colormap, resize_maps
from ..masks.label import draw_label
from ..masks.magedit_losses import LOSS_KINDS
from ..samplers.magedit import MagEditConfig, mag_edit, progress_total
from .common import LATENT_TO_IMAGE


def attention_preview(before, after, latent_mask, image_hw):
    """Edit words' attention before | after the optimisation, IMAGE [B, H, 2W + 4, 3].

    Both panels share one colour scale per image (the map's maximum over both), so a stronger
    focus inside the mask shows as a hotter region; the mask outline is drawn in white.
    """
    batch = before.shape[0]
    peak = torch.maximum(before.flatten(1).amax(1), after.flatten(1).amax(1)).clamp(min=1e-12)
    panels = []
    mask = resize_maps(latent_mask[:, 0].float(), image_hw, mode="nearest")
    mask = mask.expand(batch, *mask.shape[1:]) if mask.shape[0] == 1 else mask
    edge = (torch.nn.functional.max_pool2d(mask[:, None], 3, 1, 1)[:, 0] - mask) > 0
    for maps, label in ((before, "before"), (after, "after")):
        values = resize_maps((maps / peak[:, None, None]).float(), image_hw, mode="nearest")
        rgb = colormap(values)
        rgb[edge] = 1.0
        panels.append(draw_label(rgb, label))
    gap = torch.full((batch, image_hw[0], 4, 3), 0.5)
    return torch.cat([panels[0].cpu(), gap, panels[1].cpu()], dim=2)


class MagEdit:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the Inversion node used (same LoRAs and patches)."}),
            "inversion": ("INVERSION", {"tooltip": "From the Inversion node (null-text recommended): the "
                                                   "source image's noise, trajectory and null embeddings."}),
            "source_positive": ("CONDITIONING", {"tooltip":
                                "The source prompt from Attention Text Encode, as given to the Inversion "
                                "node: describes the image as it is ('a cat on a sofa')."}),
            "target_positive": ("CONDITIONING", {"tooltip":
                                "The target prompt from Attention Text Encode: the source prompt with the "
                                "edit applied ('a cat on a red sofa'). Words shared with the source keep "
                                "the source's attention."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative given to the Inversion node (usually "
                                                     "empty); null-text replaces its text per step."}),
            "mask": ("MASK", {"tooltip": "Region to edit, at image or latent size; any nonzero pixel "
                                         "counts. Paint it, or use InstDiffEdit / Attention Mask."}),
            "edit_words": ("STRING", {"default": "", "tooltip":
                           "Comma-separated word(s) of the target prompt to strengthen inside the mask "
                           "(e.g. 'red')."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip":
                      "DDIM steps; must equal the Inversion node's (official 50)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Guidance; use the Inversion node's cfg (official 7.5)."}),
            "optimized_steps": ("INT", {"default": 25, "min": 0, "max": 1000, "tooltip":
                                "The first steps whose latent is optimised (official 25 of 50)."}),
            "iterations": ("INT", {"default": 15, "min": 0, "max": 200, "tooltip":
                           "Optimisation iterations per optimised step (official 15); each costs a "
                           "partial forward and backward pass."}),
            "scale": ("FLOAT", {"default": 2.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                      "Loss weight; the step is scale x sigma_t x gradient (official 2.5)."}),
            "loss": (list(LOSS_KINDS), {"default": "token", "tooltip":
                     "token: token-ratio constraint (the official code); spatial: spatial-ratio; both: "
                     "their sum (the paper)."}),
            "cross_injection": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                "Fraction of steps whose shared words take the source's cross-attention "
                                "(official 0.8)."}),
            "self_injection": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                               "Fraction of steps whose self-attention (below full latent resolution) is "
                               "the source's (official 0.5)."}),
            "blend_steps": ("INT", {"default": 15, "min": 0, "max": 1000, "tooltip":
                            "In the last steps keep the source outside the mask (dilated by one latent "
                            "pixel) (official 15)."}),
        }}

    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "attention_preview")
    OUTPUT_TOOLTIPS = ("The edited latent.",
                       "The edit words' cross-attention before | after the optimisation (mean over the "
                       "optimised steps), mask outlined.")
    FUNCTION = "run"
    CATEGORY = "attention_edit/mag_edit"
    DESCRIPTION = ("MAG-Edit (Mao et al.): edits a real image inside a mask by optimising the editing "
                   "branch's latent so the edit words' cross-attention concentrates in the mask, with "
                   "Prompt-to-Prompt injection from the source reconstruction and a final blend.")

    def run(self, model, inversion, source_positive, target_positive, negative, mask, edit_words, steps, cfg,
            optimized_steps, iterations, scale, loss, cross_injection, self_injection, blend_steps):
        config = MagEditConfig(steps=steps, cfg=cfg, optimized_steps=min(optimized_steps, steps),
                               iterations=iterations, scale=scale, loss=loss,
                               cross_fraction=cross_injection, self_fraction=self_injection,
                               blend_steps=min(blend_steps, steps))
        bar = comfy.utils.ProgressBar(progress_total(config))
        result = mag_edit(model, inversion, source_positive, target_positive, negative, mask, edit_words,
                          config, progress=lambda done, total: bar.update_absolute(done, total))
        height, width = (LATENT_TO_IMAGE * s for s in result.samples.shape[-2:])
        if result.before is not None and result.after is not None:
            preview = attention_preview(result.before, result.after, result.latent_mask, (height, width))
        else:
            preview = torch.zeros(result.samples.shape[0], height, width, 3)
        return ({"samples": result.samples}, preview)


NODE_CLASS_MAPPINGS = {"AttentionEditMAGEdit": MagEdit}
NODE_DISPLAY_NAME_MAPPINGS = {"AttentionEditMAGEdit": "MAG-Edit"}
