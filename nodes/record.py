"""KSampler (Record Attention), Attention Heatmap and Attention Mask nodes."""
import torch

from ..attention.tokens import split_words
from ..masks.attention_mask import COMBINE_MODES, DEFAULT_BLUR, DEFAULT_THRESHOLD, heatmap_overlay, word_mask
from ..masks.attention_mask import combine as combine_masks
from ..masks.label import draw_label
from ..samplers.record import sample_recording
from .common import (CATEGORY, choice, LATENT_TO_IMAGE, LEVELS, NORMALISATIONS, PARTS, dit_blocks_input,
                     normalisation_input, parts_input, resolution_input, sampler_inputs)


class KSamplerRecordAttention:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = sampler_inputs()
        inputs["resolution"] = resolution_input()
        inputs["layers"] = parts_input()
        inputs["branch"] = (["cond", "uncond"], {"default": "cond", "tooltip":
                            "Record the positive (cond) or negative (uncond) prompt's attention."})
        return {"required": inputs, "optional": {"dit_blocks": dit_blocks_input(),
                                                 "normalisation": normalisation_input()}}

    RETURN_TYPES = ("LATENT", "ATTENTION_MAPS")
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("A KSampler that also records where each word of the prompt looks: the mean "
                   "cross-attention over the chosen layers and all steps (UNet models: SD1.x, SD2.x, "
                   "SDXL; DiT models: Flux, Chroma, SD3, Qwen-Image, their text-image joint attention).")

    def run(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
            denoise, resolution, layers, branch, dit_blocks="", normalisation=next(iter(NORMALISATIONS))):
        return sample_recording(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                latent_image, denoise=denoise, level=choice(LEVELS, resolution, "resolution"),
                                parts=choice(PARTS, layers, "layers"), branch=branch, dit_blocks=dit_blocks,
                                normalise=choice(NORMALISATIONS, normalisation, "normalisation"))


def _words_or_all(maps, words):
    chosen = split_words(words)
    if chosen:
        return chosen
    shown = maps.require_tokens().shown_words()
    if not shown:
        raise ValueError(f"the prompt \"{maps.tokens.text}\" has no words to show: record a prompt with "
                         "words, or type the words to show in 'words'")
    return shown


class AttentionHeatmap:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention_maps": ("ATTENTION_MAPS",),
            "image": ("IMAGE", {"tooltip": "The image the maps belong to (e.g. the VAE-decoded latent)."}),
            "words": ("STRING", {"default": "", "tooltip":
                      "Comma-separated words or phrases of the prompt; empty shows every word."}),
            "opacity": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = "One heatmap overlay per word (and per image), with the word written on it."

    def run(self, attention_maps, image, words, opacity):
        batch = attention_maps.batch
        if image.shape[0] not in (1, batch):
            raise ValueError(f"image has {image.shape[0]} images but the attention maps have {batch}; "
                             "connect the images the maps were recorded for")
        image = image.expand(batch, *image.shape[1:]) if image.shape[0] == 1 else image
        overlays = [draw_label(heatmap_overlay(image, attention_maps.word_map(word).to(image.device), opacity,
                                                   attention_maps.covered), word)
                    for word in _words_or_all(attention_maps, words)]
        return (torch.cat(overlays).to(image.dtype),)


class AttentionMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention_maps": ("ATTENTION_MAPS",),
            "words": ("STRING", {"default": "", "tooltip":
                      "Comma-separated words or phrases of the prompt whose region you want."}),
            "blur": ("FLOAT", {"default": DEFAULT_BLUR, "min": 0.0, "max": 8.0, "step": 0.1, "tooltip":
                     "Gaussian blur of the maps (sigma, in attention-map pixels) before thresholding. "
                     "0.5 keeps regions of 2x2 map cells and up; raise it (1-2) for noisy maps of large "
                     "regions (docs/recording.md measures both)."}),
            "threshold": ("FLOAT", {"default": DEFAULT_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                          "Binary mask at this fraction of each map's range; 0 gives the soft map."}),
            "combine": (list(COMBINE_MODES), {"default": "union"}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = "A MASK at image size (8x the latent) from the attention of one or more words."

    def run(self, attention_maps, words, blur, threshold, combine):
        chosen = split_words(words)
        if not chosen:
            raise ValueError("type at least one word of the prompt in 'words'")
        height, width = (LATENT_TO_IMAGE * s for s in attention_maps.latent_hw)
        masks = torch.stack([word_mask(attention_maps.word_map(word), (height, width), blur, threshold,
                                       attention_maps.covered)
                             for word in chosen])
        return (combine_masks(masks, combine).cpu(),)  # like core MASKs, off the sampling device


NODE_CLASS_MAPPINGS = {
    "AttentionEditKSamplerRecord": KSamplerRecordAttention,
    "AttentionEditHeatmap": AttentionHeatmap,
    "AttentionEditMask": AttentionMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AttentionEditKSamplerRecord": "KSampler (Record Attention)",
    "AttentionEditHeatmap": "Attention Heatmap",
    "AttentionEditMask": "Attention Mask",
}
