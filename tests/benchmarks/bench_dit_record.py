"""Recording on DiT models: KSampler (Record Attention) vs plain sampling on full-width Flux blocks.

Full-width Flux (hidden 3072, 24 heads, T5 context 4096 wide, 256 text tokens) with one double and
one single block, random weights, on CPU with PyTorch attention; recording uses the defaults (the
late double blocks: here block 0, the only one). Plain and recording runs alternate; medians are
compared, for wall time and for the CPU time of the sampling thread (torch runs on that one
thread; on a shared machine its CPU time is far steadier than wall time). Peak memory is the
largest RSS rise over a run (bench_magedit.PeakMemory); the timing is recording_cost.compare.
"""
import time

import torch

from common import pack_module
from recording_cost import compare
from ae_testlib import dit_host

record = pack_module("samplers.record")
common = pack_module("samplers.common")

OWN_MODEL = True  # run.py: this benchmark builds its own model
TEXT_TOKENS = 256


def build():
    start = time.perf_counter()
    model = dit_host.build("flux", size="full")
    model.model.diffusion_model.double_blocks = model.model.diffusion_model.double_blocks[:1]
    model.model.diffusion_model.single_blocks = model.model.diffusion_model.single_blocks[:1]
    print(f"built full-width Flux (1 double + 1 single block) in {time.perf_counter() - start:.1f} s")
    return model


def _conditioning(seed):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TEXT_TOKENS, 4096, generator=generator),
             {"pooled_output": torch.randn(1, 768, generator=generator)}]]


def _pytorch_attention():
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.modules import attention

    flux_math.optimized_attention = attention.attention_pytorch  # bound at import, as setup() does globally


def run(args, model=None):
    _pytorch_attention()
    model = model or build()
    positive, negative = _conditioning(1), _conditioning(2)
    steps = args.dit_steps
    for size in (int(s) for s in args.dit_sizes.split(",")):
        latent = {"samples": torch.zeros(1, 16, size // 8, size // 8)}
        compare(f"DiT recording, full-width Flux blocks, {size} px, {steps} step(s), cfg 1", model, positive,
                negative, latent, steps, args.repeats, normalisations=("text", "joint"))

    print("\n## DiT recorded-map memory (full-width Flux, 256 px)")
    latent = {"samples": torch.zeros(1, 16, 32, 32)}
    for steps in (2, 6):
        recorder = record.make_recorder(model, "cond", TEXT_TOKENS)
        patched = recorder.install(model.clone(), (32, 32))
        with torch.inference_mode():
            common.ksample(patched, 0, steps, 1.0, "euler", "simple", positive, negative, latent,
                           common.schedule(patched, steps, "euler", "simple", 1.0))
        print(f"  {steps} steps: {recorder.total.numel() * recorder.total.element_size()} bytes of maps "
              f"({recorder.count} block-steps summed)")
