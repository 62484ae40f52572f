"""Attention maps -> MASK / heatmap overlays (pure torch, no ComfyUI import)."""
import math

import torch
import torch.nn.functional as F

from .filters import gaussian_smooth, minmax_normalize
from .validate import check_number

COMBINE_MODES = ("union", "intersection", "mean")


def resize_maps(maps, out_hw, mode="bilinear"):
    """[B, h, w] -> [B, H, W]."""
    if tuple(maps.shape[-2:]) == tuple(out_hw):
        return maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps[:, None].float(), size=tuple(out_hw), mode=mode, **kwargs)[:, 0]


def fit_maps(maps, out_hw, covered=None, mode="bilinear"):
    """[B, h, w] -> [B, H, W] when only the top-left `covered` (rows, cols) of the map grid, in
    map cells and possibly fractional, lies on the output: a DiT's token grid and a UNet's 1/2^k
    grids round an odd latent up (13 x 17 latent -> 7 x 9 tokens cover 6.5 x 8.5). The map is
    resized so each cell keeps its true size, then the padding past the output is cropped."""
    h, w = maps.shape[-2:]
    if covered is None or (abs(covered[0] - h) < 1e-6 and abs(covered[1] - w) < 1e-6):
        return resize_maps(maps, out_hw, mode)
    out_h, out_w = out_hw
    full = (round(out_h * h / covered[0]), round(out_w * w / covered[1]))
    return resize_maps(maps, full, mode)[..., :out_h, :out_w]


def blur(maps, sigma):
    """Gaussian blur with std `sigma` in map pixels (0 = none); kernel covers 3 sigma."""
    if sigma <= 0:
        return maps
    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_smooth(maps, kernel_size=size, sigma=sigma, ae_compat=False)


# Defaults measured across region sizes (docs/recording.md, "Attention Mask defaults"): blur 0.5
# keeps a perfect map of a 2x2-token region at IoU 0.88 where 1.0 gave 0.58.
DEFAULT_BLUR, DEFAULT_THRESHOLD = 0.5, 0.5


def word_mask(word_map, out_hw, blur_sigma=DEFAULT_BLUR, threshold=DEFAULT_THRESHOLD, covered=None):
    """One word's map [B, h, w] -> mask [B, H, W] in 0..1.

    Blur at map resolution, min-max per image, upscale bilinearly (cropping a padded grid to the
    `covered` cells, fit_maps); threshold > 0 gives a binary mask (>= threshold), threshold 0
    keeps the soft map.
    """
    check_number(blur_sigma, "blur", 0.0, 8.0, hint="Gaussian sigma in attention-map pixels")
    check_number(threshold, "threshold", 0.0, 1.0, hint="fraction of each map's range; 0 gives the soft map")
    soft = minmax_normalize(blur(word_map.float(), blur_sigma))
    soft = fit_maps(soft, out_hw, covered).clamp(0, 1)
    return (soft >= threshold).float() if threshold > 0 else soft


def combine(masks, mode="union"):
    """Combine per-word masks [K, B, H, W] -> [B, H, W]."""
    if mode == "union":
        return masks.amax(0)
    if mode == "intersection":
        return masks.amin(0)
    if mode == "mean":
        return masks.mean(0)
    raise ValueError(f"combine must be one of {COMBINE_MODES}, got {mode!r}")


def colormap(values):
    """Values in 0..1 [..] -> RGB [.., 3] with a blue-cyan-yellow-red ramp (jet-like)."""
    v = values.clamp(0, 1)[..., None]
    stops = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.5, 1.0], [0.5, 1.0, 0.5], [1.0, 1.0, 0.0],
                          [1.0, 0.0, 0.0]], device=values.device, dtype=torch.float32)
    pos = v * (len(stops) - 1)
    low = pos.floor().clamp(max=len(stops) - 2).long()
    frac = pos - low
    return stops[low[..., 0]] * (1 - frac) + stops[low[..., 0] + 1] * frac


def heatmap_overlay(image, word_map, opacity=0.6, covered=None):
    """image [B, H, W, 3] in 0..1 and a map [B, h, w] -> overlay [B, H, W, 3] (`covered`: fit_maps)."""
    soft = fit_maps(minmax_normalize(word_map.float()), image.shape[1:3], covered).clamp(0, 1)
    return overlay(image, soft, opacity)


def overlay(image, soft, opacity=0.6):
    """image [B, H, W, 3] in 0..1 and soft maps [B, H, W] in 0..1 at image size -> overlay."""
    check_number(opacity, "opacity", 0.0, 1.0)
    return (image[..., :3].float() * (1 - opacity) + colormap(soft) * opacity).clamp(0, 1)
