"""InstDiffEdit and InstDiffEdit Mask nodes."""
import torch

from ..masks.video import latent_frame_of, pixel_frame_masks, pixel_frames
from ..samplers.common import output_latent
from ..samplers.instdiffedit import mask_from_maps, sample_instdiffedit
from .common import CATEGORY, LATENT_TO_IMAGE

BACKGROUND_CHOICES = {
    "official (step's sigma)": "official",
    "matching (next sigma)": "matching",
}
PREVIEW_MAX_FRAMES = 32


def _threshold_inputs():
    return {
        "theta_hi": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                     "Words whose map is at least this similar (cosine) to the chosen word's map "
                     "are added to the edit region (official 0.9)."}),
        "theta_lo": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                     "Words at most this similar are subtracted as background (official benchmark "
                     "0.6, demo 0.3)."}),
        "phi": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip":
                "Mask threshold on the blurred, normalised map (official benchmark 0.2, demo 0.3)."}),
    }


def to_image_mask(mask, scale=LATENT_TO_IMAGE):
    """Latent-size mask [B, H, W] -> MASK [B, sH, sW] float 0/1 on the CPU (s = `scale`: 8, Flux.2 16).
    Video (Wan) masks per latent frame [B, F', H, W] -> one per decoded frame, batch-major."""
    mask = mask.float().cpu()
    if mask.dim() == 4:
        return pixel_frame_masks(mask, scale)
    return mask.repeat_interleave(scale, -2).repeat_interleave(scale, -1)


def step_strip(step_masks, max_frames=PREVIEW_MAX_FRAMES):
    """[steps, B, H, W] -> IMAGE [B, H, frames * (W + 1) - 1, 3]: the per-step masks side by side
    (white = edited), separated by gray columns; at most max_frames steps, the last always shown.
    Video masks [steps, B, F', H, W]: one strip per decoded frame, batch-major (as the MASK)."""
    if step_masks.dim() == 5:
        index = latent_frame_of(pixel_frames(step_masks.shape[2])).to(step_masks.device)
        step_masks = step_masks[:, :, index].flatten(1, 2)
    steps = step_masks.shape[0]
    if steps > max_frames:
        chosen = torch.linspace(0, steps - 1, max_frames).round().long()
        step_masks = step_masks[chosen.unique()]
    masks = step_masks.float().cpu()
    frames, batch, height, width = masks.shape
    separator = torch.full((batch, height, 1), 0.5)
    columns = []
    for i in range(frames):
        if i:
            columns.append(separator)
        columns.append(masks[i])
    return torch.cat(columns, dim=-1)[..., None].expand(-1, -1, -1, 3).contiguous()


class InstDiffEdit:
    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        samplers, schedulers = comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD1.x / SD2.x / SDXL, or Flux, Flux.2, SD3 / SD3.5, Qwen-Image, Z-Image, "
                      "HunyuanImage 2.1 (their joint attention gives the mask; docs/instdiffedit.md), or Wan "
                      "2.1 / 2.2 video (a mask per frame; docs/video.md)."}),
            "positive": ("CONDITIONING", {"tooltip":
                         "The target prompt (what the edited image shows, e.g. 'a photo of a "
                         "raccoon') from Attention Text Encode: the mask comes from its words."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (official: empty)."}),
            "source": ("LATENT", {"tooltip": "The image to edit (VAE Encode); one edit per image. "
                       "On Wan: the video to edit (VAE Encode of its frames with the Wan VAE)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "control_after_generate": True}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip":
                      "Length of the whole schedule; strength x steps of it are run (official 50 "
                      "x 0.5 = 25 steps)."}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip":
                         "How far the source is noised before denoising (official 0.5)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance (official 7.5). Flux dev is "
                              "guidance-distilled: use 1 and FluxGuidance on the prompt."}),
            "sampler_name": (samplers, {"default": "lms" if "lms" in samplers else samplers[0]}),
            "scheduler": (schedulers, {"default": "normal" if "normal" in schedulers else schedulers[0]}),
            "copies": ("INT", {"default": 3, "min": 1, "max": 64, "tooltip":
                       "Noised copies of each image, batched, each with its own noise; their "
                       "attention is averaged into one mask per image (official 3)."}),
            **_threshold_inputs(),
            "background_noise": (list(BACKGROUND_CHOICES), {"tooltip":
                                 "Outside the mask the latent is replaced by the source noised "
                                 "with the copy's noise. Official: to the sigma of the step just "
                                 "taken (one step noisier than the latent, as the official code); "
                                 "matching: to the latent's own sigma."}),
        }}

    RETURN_TYPES = ("LATENT", "MASK", "IMAGE")
    RETURN_NAMES = ("latent", "mask", "mask_steps")
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "InstDiffEdit (AAAI 2024): denoises the noised source towards the target prompt, builds a "
        "mask from the prompt's cross-attention at every step and keeps the source outside it. "
        "Outputs the blended latent (one per image), the final mask at image size (feed it to an "
        "inpainting workflow, as the paper does) and a strip of the per-step masks. Runs on SD1.x, "
        "SD2.x, SDXL, on the DiT models Flux, Flux.2, SD3 / SD3.5, Qwen-Image, Z-Image and HunyuanImage 2.1, "
        "and on Wan 2.1 / 2.2 video (one mask per decoded frame).")

    def run(self, model, positive, negative, source, seed, steps, strength, cfg, sampler_name,
            scheduler, copies, theta_hi, theta_lo, phi, background_noise):
        result = sample_instdiffedit(model, positive, negative, source, seed, steps=steps,
                                     strength=strength, cfg=cfg, sampler_name=sampler_name,
                                     scheduler=scheduler, copies=copies, theta_hi=theta_hi,
                                     theta_lo=theta_lo, phi=phi,
                                     background=BACKGROUND_CHOICES[background_noise])
        return (output_latent(source, result.samples), to_image_mask(result.mask, result.pixel_scale),
                step_strip(result.step_masks))


class InstDiffEditMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention_maps": ("ATTENTION_MAPS", {"tooltip":
                               "Maps from KSampler (Record Attention) with the prompt encoded by "
                               "Attention Text Encode: UNets at resolution 1/4; DiT models (Flux, "
                               "Flux.2, SD3, Qwen-Image, Z-Image, HunyuanImage 2.1, Wan video) with any "
                               "dit_blocks; HunyuanImage and Wan with normalisation 'joint (all keys)' "
                               "(Wan: one mask per decoded frame)."}),
            **_threshold_inputs(),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("The InstDiffEdit mask refinement on its own: picks the prompt's word most like "
                   "the (inverted) start-token map, adds similar words, subtracts dissimilar ones, "
                   "blurs and thresholds. MASK at image size.")

    def run(self, attention_maps, theta_hi, theta_lo, phi):
        return (to_image_mask(mask_from_maps(attention_maps, theta_hi, theta_lo, phi), attention_maps.pixel_scale),)


NODE_CLASS_MAPPINGS = {
    "AttentionEditInstDiffEdit": InstDiffEdit,
    "AttentionEditInstDiffEditMask": InstDiffEditMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AttentionEditInstDiffEdit": "InstDiffEdit",
    "AttentionEditInstDiffEditMask": "InstDiffEdit Mask",
}
