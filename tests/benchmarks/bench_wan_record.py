"""Recording on Wan video: KSampler (Record Attention) vs plain sampling on a full-width Wan 2.1 1.3B
block (dim 1536, 12 heads of 128, FFN 8960, umT5 context 512 x 4096 with 20 real tokens), random
weights, CPU, PyTorch attention, cfg 1. Default 480 x 832, 33 frames: latent 9 x 60 x 104, 14040
video tokens. Plain and recording runs alternate; medians of wall time and of the sampling
thread's CPU time; peak memory is the largest RSS rise over a run (recording_cost.compare).
"""
import time

import torch

from recording_cost import compare
from ae_testlib import wan_host

OWN_MODEL = True  # run.py: this benchmark builds its own model
REAL_TOKENS = 20


def _conditioning(seed):
    generator = torch.Generator().manual_seed(seed)
    cond = torch.zeros(1, wan_host.TEXT_LEN, 4096)
    cond[:, :REAL_TOKENS] = torch.randn(1, REAL_TOKENS, 4096, generator=generator)  # padding zeroed, as umT5's
    return [[cond, {}]]


def run(args, model=None):
    from comfy.ldm.modules import attention
    from comfy.ldm.wan import model as wan_model

    wan_model.optimized_attention = attention.attention_pytorch  # bound at import, as setup() does globally
    start = time.perf_counter()
    model = model or wan_host.build("wan21", size="full")
    print(f"built one full-width Wan 1.3B block in {time.perf_counter() - start:.1f} s")
    positive, negative = _conditioning(1), _conditioning(2)
    height, width, frames = (int(v) for v in args.wan_size.split("x"))
    latent = {"samples": torch.zeros(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)}
    steps = args.dit_steps
    title = f"Wan recording, one full-width 1.3B block, {height}x{width}, {frames} frames, {steps} step(s), cfg 1"
    compare(title, model, positive, negative, latent, steps, args.repeats)
