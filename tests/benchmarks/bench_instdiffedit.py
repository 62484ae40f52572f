"""InstDiffEdit sampler vs plain img2img sampling (comfy.sample.sample) at equal steps, strength
and batch: both run the same int(steps x strength) steps of the same schedule on 3 copies of the
image with CFG, so the ratio is the cost of recording the 1/4 attention layers, building the mask
every step and blending. Target <= 1.10x.

    python tests/benchmarks/run.py --only instdiffedit [--repeats 3 --steps-256 4 --steps-512 2]

--steps-N are the denoising steps at N px (the schedule is twice as long, strength 0.5).
"""
import torch

from common import interleaved, pack_module, random_conditioning, report

instdiffedit = pack_module("samplers.instdiffedit")
common = pack_module("samplers.common")

COPIES, STRENGTH, CFG = 3, 0.5, 7.5
SAMPLER, SCHEDULER = "lms", "normal"  # the official LMS schedule
PROMPT = "a photo of a raccoon"


def variants(model, positive, negative, source, steps, copies=COPIES, strength=STRENGTH, cfg=CFG,
             sampler=SAMPLER, scheduler=SCHEDULER):
    """{name: run} of img2img KSampler on `copies` copies of `source` and InstDiffEdit on the same
    schedule (also tests/device/run.py); each returns its result. Returns (variants, sigmas)."""
    sigmas = instdiffedit.edit_schedule(model, steps, sampler, scheduler, strength)
    batch = {"samples": source.repeat(copies, *([1] * (source.dim() - 1)))}

    def plain():
        # img2img on the same batch of copies, same sigmas (explicit), same sampler
        return common.ksample(model, 0, steps, cfg, sampler, scheduler, positive, negative, batch, sigmas,
                              callback=lambda *a: None)

    def edit():
        return instdiffedit.sample_instdiffedit(model, positive, negative, {"samples": source}, 0, steps=steps,
                                                strength=strength, cfg=cfg, sampler_name=sampler,
                                                scheduler=scheduler, copies=copies, callback=lambda *a: None)

    return {"img2img KSampler": plain, "InstDiffEdit": edit}, sigmas


def run(args, model, sizes=None):
    context_dim = model.model.model_config.unet_config["context_dim"]
    positive = random_conditioning(PROMPT, dim=context_dim, seed=1)
    negative = random_conditioning(dim=context_dim, seed=2)
    sizes = sizes or ((256, args.steps_256), (512, args.steps_512))
    for size, denoising_steps in sizes:
        if denoising_steps < 1:
            continue
        steps = int(round(denoising_steps / STRENGTH))
        source = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        runs, sigmas = variants(model, positive, negative, source, steps)
        medians, _ = interleaved(runs, args.repeats)
        report(f"InstDiffEdit, SD1.5 {size} px, {len(sigmas) - 1} of {steps} steps (strength "
               f"{STRENGTH}), batch {COPIES} copies, CFG {CFG}, {SAMPLER}", medians,
               "img2img KSampler", target=1.10)
