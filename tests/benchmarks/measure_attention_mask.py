"""Attention Mask defaults (blur, threshold) across region sizes (docs/recording.md).

Pure tensor math, no ComfyUI: a word map on a token grid is exp(beta * region + noise), noise
iid N(0, sigma) per token (sigma 0: a perfect map), 20 noise seeds; the mask at image size
(16 px per token, DiT: a token is 2x2 latent pixels) against the region: IoU mean / min.

    python tests/benchmarks/measure_attention_mask.py
"""
import statistics

import torch

from common import pack_module

attention_mask = pack_module("masks.attention_mask")

CELL = 16  # image pixels per DiT token
GRID = (12, 17)  # a 24 x 34 latent
REGIONS = {"1x1": (1, 1), "2x2": (2, 2), "3x4": (3, 4), "6x6": (6, 6), "8x12": (8, 12)}
BETA = 2.0  # region logit above the rest


def one(size, sigma, blur, threshold, seed):
    h, w = GRID
    region = torch.zeros(h, w)
    top, left = 3, 4
    region[top:top + size[0], left:left + size[1]] = 1
    noise = torch.randn(h, w, generator=torch.Generator().manual_seed(seed)) * sigma
    word_map = torch.exp(BETA * region + noise)[None]
    mask = attention_mask.word_mask(word_map, (h * CELL, w * CELL), blur, threshold)[0] > 0.5
    truth = region.repeat_interleave(CELL, 0).repeat_interleave(CELL, 1) > 0.5
    return float((mask & truth).sum() / (mask | truth).sum())


def main():
    blurs, thresholds, sigmas = (0.0, 0.5, 0.75, 1.0), (0.3, 0.5), (0.0, 0.5, 1.0)
    print("| noise sigma | blur | threshold | " + " | ".join(REGIONS) + " |")
    for sigma in sigmas:
        for blur in blurs:
            for threshold in thresholds:
                cells = []
                for size in REGIONS.values():
                    ious = [one(size, sigma, blur, threshold, seed) for seed in range(20 if sigma else 1)]
                    cells.append(f"{statistics.mean(ious):.2f} / {min(ious):.2f}")
                print(f"| {sigma:g} | {blur:g} | {threshold:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
