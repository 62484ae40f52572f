"""InstDiffEdit on Flux vs plain img2img at equal steps, on full-width Flux blocks.

The model is bench_dit_record's (full-width Flux, one double + one single block, random weights,
PyTorch attention on CPU); the target prompt has the real T5 layout (256 tokens). Both variants
run the same int(steps x strength) steps of the same schedule on 3 copies of the image, cfg 1
(Flux dev is guidance-distilled), euler: the ratio is the cost of recording the default blocks,
building the mask every step and blending. Target <= 1.10x; wall and sampling-thread CPU time.

    python tests/benchmarks/run.py --only instdiffedit_dit [--dit-sizes 512,1024 --repeats 4]
"""
import statistics

import torch

import bench_dit_record
from common import cpu_timed, interleaved, pack_module, report
from ae_testlib import dit_text

instdiffedit = pack_module("samplers.instdiffedit")
common = pack_module("samplers.common")
tokens_mod = pack_module("attention.tokens")
text_encoders = pack_module("attention.text_encoders")

OWN_MODEL = True  # run.py: this benchmark builds its own model
COPIES, STRENGTH, CFG = 3, 0.5, 1.0
SAMPLER, SCHEDULER = "euler", "simple"
PROMPT = "a photo of a raccoon on grass"
DENOISING_STEPS = 2


def run(args, model=None):
    bench_dit_record._pytorch_attention()
    model = model or bench_dit_record.build()
    tokens = text_encoders.prompt_tokens(dit_text.build_dit_clip("flux"), PROMPT)
    assert tokens.n_tokens == bench_dit_record.TEXT_TOKENS
    positive = tokens_mod.annotate(bench_dit_record._conditioning(1), tokens)
    negative = bench_dit_record._conditioning(2)
    steps = int(round(DENOISING_STEPS / STRENGTH))
    for size in (int(s) for s in args.dit_sizes.split(",")):
        source = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        sigmas = instdiffedit.edit_schedule(model, steps, SAMPLER, SCHEDULER, STRENGTH)
        copies = {"samples": source.repeat(COPIES, 1, 1, 1)}
        def plain():
            common.ksample(model, 0, steps, CFG, SAMPLER, SCHEDULER, positive, negative, copies, sigmas,
                           callback=lambda *a: None)

        def edit():
            instdiffedit.sample_instdiffedit(model, positive, negative, {"samples": source}, 0, steps=steps,
                                             strength=STRENGTH, cfg=CFG, sampler_name=SAMPLER,
                                             scheduler=SCHEDULER, copies=COPIES, callback=lambda *a: None)

        variants, cpu = cpu_timed({"img2img KSampler": plain, "InstDiffEdit": edit})
        medians, runs = interleaved(variants, args.repeats)
        title = (f"InstDiffEdit on full-width Flux blocks, {size} px, {len(sigmas) - 1} of {steps} steps "
                 f"(strength {STRENGTH}), {COPIES} copies, cfg {CFG}, {SAMPLER}")
        report(title, medians, "img2img KSampler", target=1.10)
        for name, values in runs.items():
            print(f"  {name:<28} runs: {', '.join(f'{v:.2f}' for v in values)} s")
        report("same runs, CPU time of the sampling thread", {n: statistics.median(v) for n, v in cpu.items()},
               "img2img KSampler", target=1.10)
