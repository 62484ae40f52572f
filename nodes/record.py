"""KSampler (Record Attention), Attention Heatmap and Attention Mask nodes."""
import torch

from ..attention.tokens import split_words
from ..masks.attention_mask import (COMBINE_MODES, DEFAULT_BLUR, DEFAULT_THRESHOLD, heatmap_overlay, overlay,
                                    word_mask)
from ..masks.attention_mask import combine as combine_masks
from ..masks.label import draw_label
from ..masks.video import latent_frame_of, pixel_frames, video_soft_maps, video_word_mask
from ..samplers.record import sample_recording
from .common import (CATEGORY, choice, LEVELS, NORMALISATIONS, PARTS, branch_input,
                     dit_blocks_input, normalisation_input, parts_input, resolution_input, sampler_inputs)


class KSamplerRecordAttention:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = sampler_inputs()
        inputs["resolution"] = resolution_input()
        inputs["layers"] = parts_input()
        inputs["branch"] = branch_input()
        return {"required": inputs, "optional": {"dit_blocks": dit_blocks_input(),
                                                 "normalisation": normalisation_input()}}

    RETURN_TYPES = ("LATENT", "ATTENTION_MAPS")
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("A KSampler that also records where each word of the prompt looks: the mean "
                   "cross-attention over the chosen layers and all steps (UNet models: SD1.x, SD2.x, "
                   "SDXL; DiT models: Flux, Chroma, SD3, Qwen-Image, their text-image joint attention; "
                   "Wan 2.1 / 2.2 video: the text cross-attention, one map per latent frame).")

    def run(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
            denoise, resolution, layers, branch, dit_blocks="", normalisation=next(iter(NORMALISATIONS))):
        return sample_recording(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                latent_image, denoise=denoise, level=choice(LEVELS, resolution, "resolution"),
                                parts=choice(PARTS, layers, "layers"), branch=branch, dit_blocks=dit_blocks,
                                normalise=choice(NORMALISATIONS, normalisation, "normalisation"))


class KSamplerAdvancedRecordAttention:
    """KSamplerAdvanced that records: for samplers that share one latent in stages (Wan 2.2 14B's
    high-noise then low-noise expert), each continuing the previous stage's ATTENTION_MAPS."""

    @classmethod
    def INPUT_TYPES(cls):
        base = sampler_inputs()
        inputs = {"model": base["model"],
                  "add_noise": (["enable", "disable"], {"default": "enable"}),
                  "noise_seed": base["seed"]}
        inputs.update({name: base[name] for name in ("steps", "cfg", "sampler_name", "scheduler", "positive",
                                                     "negative", "latent_image")})
        inputs["start_at_step"] = ("INT", {"default": 0, "min": 0, "max": 10000})
        inputs["end_at_step"] = ("INT", {"default": 10000, "min": 0, "max": 10000})
        inputs["return_with_leftover_noise"] = (["disable", "enable"], {"default": "disable"})
        inputs["resolution"] = resolution_input()
        inputs["layers"] = parts_input()
        inputs["branch"] = branch_input()
        return {"required": inputs, "optional": {
            "dit_blocks": dit_blocks_input(), "normalisation": normalisation_input(),
            "attention_maps": ("ATTENTION_MAPS", {"tooltip":
                               "The previous stage's maps (e.g. Wan 2.2 14B's high-noise expert): the output "
                               "is then the mean over both stages' steps, one map for the whole sampling."})}}

    RETURN_TYPES = ("LATENT", "ATTENTION_MAPS")
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("KSampler (Advanced) that also records attention maps, like KSampler (Record Attention). "
                   "Chain two for Wan 2.2 14B (high-noise expert: add_noise enable, steps 0 to N, leftover "
                   "noise enable; low-noise expert: add_noise disable, from N, its attention_maps input "
                   "from the first) to get one map over all steps.")

    def run(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
            latent_image, start_at_step, end_at_step, return_with_leftover_noise, resolution, layers, branch,
            dit_blocks="", normalisation=next(iter(NORMALISATIONS)), attention_maps=None):
        advanced = {"add_noise": choice({"enable": True, "disable": False}, add_noise, "add_noise"),
                    "start_step": start_at_step, "last_step": end_at_step,
                    "force_full_denoise": choice({"disable": True, "enable": False}, return_with_leftover_noise,
                                                 "return_with_leftover_noise")}
        return sample_recording(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                latent_image, level=choice(LEVELS, resolution, "resolution"),
                                parts=choice(PARTS, layers, "layers"), branch=branch, dit_blocks=dit_blocks,
                                normalise=choice(NORMALISATIONS, normalisation, "normalisation"),
                                advanced=advanced, previous=attention_maps)


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
    DESCRIPTION = ("One heatmap overlay per word (and per image), with the word written on it. Video maps "
                   "(Wan): every decoded frame gets its overlay, word after word.")

    def run(self, attention_maps, image, words, opacity):
        if attention_maps.frames is not None:
            return (_video_heatmaps(attention_maps, image, words, opacity),)
        batch = attention_maps.batch
        if image.shape[0] not in (1, batch):
            raise ValueError(f"image has {image.shape[0]} images but the attention maps have {batch}; "
                             "connect the images the maps were recorded for")
        image = image.expand(batch, *image.shape[1:]) if image.shape[0] == 1 else image
        overlays = [draw_label(heatmap_overlay(image, attention_maps.word_map(word).to(image.device), opacity,
                                                   attention_maps.covered), word)
                    for word in _words_or_all(attention_maps, words)]
        return (torch.cat(overlays).to(image.dtype),)


def _video_heatmaps(maps, image, words, opacity):
    """Overlays on each decoded frame ([batch * frames, H, W, 3], batch-major, as VAE Decode gives
    a video), per word: [words * batch * frames, H, W, 3]."""
    frames = pixel_frames(maps.frames)
    if image.shape[0] != maps.batch * frames:
        per_video = image.shape[0] / maps.batch
        if per_video == int(per_video):
            latent_frame_of(int(per_video), maps.frames, "image")  # says which frame count is wrong
        raise ValueError(f"image has {image.shape[0]} frames but the attention maps are {maps.batch} video(s) of "
                         f"{frames} frames ({maps.batch * frames} in all): connect the VAE-decoded video the "
                         "maps were recorded for")
    overlays = []
    for word in _words_or_all(maps, words):
        soft = video_soft_maps(maps.word_map(word).to(image.device), image.shape[1:3], blur_sigma=0.0,
                               covered=maps.covered)
        overlays.append(draw_label(overlay(image, soft.flatten(0, 1), opacity), word))
    return torch.cat(overlays).to(image.dtype)


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
        }, "optional": {
            "temporal_smoothing": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 8.0, "step": 0.1, "tooltip":
                                   "Video maps only: Gaussian blur along time, in latent frames (1 latent "
                                   "frame = 4 video frames), before thresholding; 0 = none."}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("A MASK at image size (8x the latent; 16x on Flux.2, 32x on HunyuanImage 2.1) from the attention of one or more words. Video maps "
                   "(Wan): one MASK per decoded frame (1 + 4 x (latent frames - 1)), 8x (2.1) / 16x (2.2 5B) "
                   "the latent, for SetLatentNoiseMask or WanVaceToVideo's control_masks.")

    def run(self, attention_maps, words, blur, threshold, combine, temporal_smoothing=0.0):
        chosen = split_words(words)
        if not chosen:
            raise ValueError("type at least one word of the prompt in 'words'")
        scale = attention_maps.pixel_scale  # the VAE's: 8 (UNets, most DiTs), 16 (Flux.2, Wan 2.2 5B), 32 (HunyuanImage)
        height, width = (scale * s for s in attention_maps.latent_hw)
        if attention_maps.frames is not None:  # [batch, pixel frames, H, W] -> MASK [batch * frames, H, W]
            masks = torch.stack([video_word_mask(attention_maps.word_map(word), (height, width), blur, threshold,
                                                 temporal_smoothing, attention_maps.covered).flatten(0, 1)
                                 for word in chosen])
        else:
            masks = torch.stack([word_mask(attention_maps.word_map(word), (height, width), blur, threshold,
                                           attention_maps.covered)
                                 for word in chosen])
        return (combine_masks(masks, combine).cpu(),)  # like core MASKs, off the sampling device


NODE_CLASS_MAPPINGS = {
    "AttentionEditKSamplerRecord": KSamplerRecordAttention,
    "AttentionEditKSamplerAdvancedRecord": KSamplerAdvancedRecordAttention,
    "AttentionEditHeatmap": AttentionHeatmap,
    "AttentionEditMask": AttentionMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AttentionEditKSamplerRecord": "KSampler (Record Attention)",
    "AttentionEditKSamplerAdvancedRecord": "KSampler Advanced (Record Attention)",
    "AttentionEditHeatmap": "Attention Heatmap",
    "AttentionEditMask": "Attention Mask",
}
