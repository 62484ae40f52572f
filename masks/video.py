"""Video attention maps -> per-frame masks and overlays (pure torch, no ComfyUI import).

Wan's causal VAE encodes the first pixel frame alone and every later group of 4 into one latent
frame: 1 + 4k pixel frames <-> k + 1 latent frames. Recorded maps have one map per latent frame;
masks and overlays are given one per pixel frame, so a MASK batch lines up with the decoded video
frame for frame (VAE Decode: [batch * frames, H, W, 3], batch-major).
"""
import math

import torch
import torch.nn.functional as F

from .attention_mask import DEFAULT_BLUR, DEFAULT_THRESHOLD, blur, fit_maps
from .validate import check_number

TEMPORAL = 4  # pixel frames per latent frame after the first (Wan 2.1 and 2.2 VAEs)


def pixel_frames(latent_frames):
    """Decoded frames of `latent_frames` Wan latent frames."""
    return 1 + TEMPORAL * (int(latent_frames) - 1)


def latent_frame_of(n_pixel_frames, latent_frames=None, what="the video"):
    """Index of the latent frame each of `n_pixel_frames` pixel frames was encoded into: frame 0 ->
    0, frames 1-4 -> 1, 5-8 -> 2, ... A count Wan cannot decode (not 1 + 4k), or one that does not
    match `latent_frames`, is a ValueError naming the counts that fit."""
    n = int(n_pixel_frames)
    if n < 1 or (n - 1) % TEMPORAL:
        low = 1 + TEMPORAL * max(0, (n - 1) // TEMPORAL)
        raise ValueError(f"{what} has {n} frames, which Wan's VAE cannot decode: it decodes 1 + 4k frames "
                         f"(1, 5, 9, ..., 33, ..., 81); the nearest are {low} and {low + TEMPORAL}")
    if latent_frames is not None and n != pixel_frames(latent_frames):
        raise ValueError(f"{what} has {n} frames but the attention maps were recorded on {latent_frames} latent "
                         f"frames, which decode to {pixel_frames(latent_frames)}: connect the video those maps "
                         "were recorded for")
    return torch.tensor([(p + TEMPORAL - 1) // TEMPORAL for p in range(n)], dtype=torch.long)


def temporal_blur(maps, sigma):
    """Gaussian blur along the frame axis of [B, F, h, w] maps (sigma in latent frames; 0 = none)."""
    check_number(sigma, "temporal_smoothing", 0.0, 8.0, hint="Gaussian sigma in latent frames")
    frames = maps.shape[1]
    if sigma <= 0 or frames < 2:
        return maps
    radius = min(math.ceil(3 * sigma), frames - 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum())[None, None]
    b, _, h, w = maps.shape
    series = maps.float().permute(0, 2, 3, 1).reshape(-1, 1, frames)  # one series per pixel
    series = F.conv1d(F.pad(series, (radius, radius), mode="replicate"), kernel)
    return series.reshape(b, h, w, frames).permute(0, 3, 1, 2)


def normalise_per_video(maps, eps=1e-12):
    """Min-max to [0, 1] over all frames of each video [B, F, h, w]: a frame where the word is weaker
    than elsewhere in the video stays weaker (per-frame min-max would give every frame a region)."""
    flat = maps.flatten(1)
    lo = flat.amin(-1, keepdim=True)
    rng = flat.amax(-1, keepdim=True) - lo
    out = torch.where(rng > eps, (flat - lo) / rng.clamp_min(eps), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def video_soft_maps(word_map, out_hw, blur_sigma=DEFAULT_BLUR, temporal_sigma=0.0, covered=None):
    """One word's video map [B, F, h, w] -> soft maps [B, F', H, W] in 0..1, F' = the pixel frames.
    Spatial blur per frame (map pixels), optional blur along frames, min-max per video, bilinear
    upscale (an odd latent's padded token grid cropped to the `covered` cells, fit_maps), then
    each pixel frame takes its latent frame's map."""
    check_number(blur_sigma, "blur", 0.0, 8.0, hint="Gaussian sigma in attention-map pixels")
    b, f, h, w = word_map.shape
    maps = blur(word_map.float().reshape(b * f, h, w), blur_sigma).reshape(b, f, h, w)
    soft = normalise_per_video(temporal_blur(maps, temporal_sigma))
    soft = fit_maps(soft.reshape(b * f, h, w), out_hw, covered).clamp(0, 1).reshape(b, f, *out_hw)
    return soft[:, latent_frame_of(pixel_frames(f)).to(soft.device)]


def video_word_mask(word_map, out_hw, blur_sigma=DEFAULT_BLUR, threshold=DEFAULT_THRESHOLD, temporal_sigma=0.0,
                    covered=None):
    """[B, F, h, w] -> masks [B, F', H, W]: binary (>= threshold) or soft (threshold 0)."""
    check_number(threshold, "threshold", 0.0, 1.0, hint="fraction of each video's range; 0 gives the soft map")
    soft = video_soft_maps(word_map, out_hw, blur_sigma, temporal_sigma, covered)
    return (soft >= threshold).float() if threshold > 0 else soft


def pixel_frame_masks(mask, scale):
    """Latent-size masks per latent frame [B, F, H, W] -> one per decoded frame at pixel size,
    batch-major [B * F', scale * H, scale * W] (F' = 1 + 4 (F - 1)), as VAE Decode gives a video."""
    index = latent_frame_of(pixel_frames(mask.shape[1])).to(mask.device)
    pixels = mask[:, index].repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    return pixels.flatten(0, 1)
