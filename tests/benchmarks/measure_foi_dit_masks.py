"""FoI keyword masks on a DiT token grid (masks.foi.dit_keyword_masks) across region sizes,
planting strengths and `mask_upsample` (docs/foi.md, "The blur").

Pure tensor math, no ComfyUI: a keyword's text-renormalised map on a 16 x 24 token grid, the
softmax share of the keyword among 256 text tokens (Kontext's T5 length) whose logits are
beta on the region for the keyword, plus fixed noise N(0, sigma) per (token, text token) (sigma 0:
a clean plant); 10 noise seeds. Eq. 2 with the defaults (gamma 3, tau 0.5, 3x3 sigma 0.5 filter);
IoU with the region at the token grid, mean / min.

    python tests/benchmarks/measure_foi_dit_masks.py
"""
import statistics

import torch

from common import pack_module

foi = pack_module("masks.foi")

GRID, TEXT = (16, 24), 256
REGIONS = {"1x1": (1, 1), "1x2": (1, 2), "2x2": (2, 2), "3x3": (3, 3), "4x4": (4, 4), "6x6": (6, 6)}


def keyword_map(size, beta, sigma, seed):
    h, w = GRID
    region = torch.zeros(h, w)
    region[5:5 + size[0], 7:7 + size[1]] = 1
    logits = torch.randn(h, w, TEXT, generator=torch.Generator().manual_seed(seed)) * sigma
    logits[..., 0] += beta * region
    return torch.softmax(logits, -1)[..., 0], region > 0


def iou(found, expected):
    return float((found & expected).sum() / (found | expected).sum().clamp(min=1))


def main(upsamples=(1, 4, 8), betas=(4.0, 8.0, 12.0), sigmas=(0.0, 1.0), taus=(0.5, 0.4)):
    print("| noise | beta | tau | mask_upsample | " + " | ".join(REGIONS) + " |")
    for sigma in sigmas:
        for beta in betas:
            for tau in taus:
                for upsample in upsamples:
                    cells = []
                    for size in REGIONS.values():
                        ious = []
                        for seed in range(10 if sigma else 1):
                            kmap, region = keyword_map(size, beta, sigma, seed)
                            masks, _ = foi.dit_keyword_masks(kmap[None, None], tau=tau, upsample=upsample)
                            ious.append(iou(masks[0, 0] > 0.5, region))
                        cells.append(f"{statistics.mean(ious):.2f} / {min(ious):.2f}" if sigma else f"{ious[0]:.2f}")
                    print(f"| {sigma:g} | {beta:g} | {tau:g} | {upsample} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
