"""Recording on Z-Image: KSampler (Record Attention) vs plain sampling on one full-width Z-Image
main layer (dim 3840, 30 heads of 128, FFN 10240; the recorded layer) with one context-refiner and
one noise-refiner layer of the same width, Qwen3-4B captions 2560 wide (TEXT_TOKENS real tokens,
padded to 32s by the model), random weights, CPU, one thread, PyTorch attention, cfg 1 (Z-Image
Turbo's setting). Timing and memory: recording_cost.compare.
"""
import time

import torch

from recording_cost import compare
from ae_testlib import dit_host

OWN_MODEL = True  # run.py: this benchmark builds its own model
TEXT_TOKENS = 100  # a descriptive Z-Image prompt in its chat template (padded to 128 in the model)


def build():
    start = time.perf_counter()
    model = dit_host.build("zimage", size="full", depth={"n_layers": 1, "n_refiner_layers": 1})
    print(f"built full-width Z-Image (1 main layer + 1 + 1 refiner layers) in {time.perf_counter() - start:.1f} s")
    return model


def _conditioning(seed):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TEXT_TOKENS, 2560, generator=generator), {}]]


def run(args, model=None):
    from comfy.ldm.lumina import model as lumina
    from comfy.ldm.modules import attention

    lumina.optimized_attention_masked = attention.attention_pytorch  # bound at import, as setup() does globally
    model = model or build()
    positive, negative = _conditioning(1), _conditioning(2)
    steps = args.dit_steps
    for size in (int(s) for s in args.z_image_sizes.split(",")):
        latent = {"samples": torch.zeros(1, 16, size // 8, size // 8)}
        compare(f"Z-Image recording, one full-width main layer, {size} px, {steps} step(s), cfg 1", model, positive,
                negative, latent, steps, args.repeats, normalisations=("text", "joint"))
