"""Capture overhead of KSampler (Record Attention) vs plain KSampler, and map memory vs steps."""
import torch

from common import interleaved, pack_module, random_conditioning, report

record = pack_module("samplers.record")
common = pack_module("samplers.common")
recorder_mod = pack_module("attention.recorder")


def variants(model, positive, negative, latent, steps, cfg=7.5, sampler="euler", scheduler="normal"):
    """{name: run} of plain KSampler and KSampler (Record Attention) on the same inputs (also
    tests/device/run.py); each returns the sampled LATENT."""
    sigmas = common.schedule(model, steps, sampler, scheduler, 1.0)

    def plain():
        return common.ksample(model, 0, steps, cfg, sampler, scheduler, positive, negative, latent, sigmas)

    def recording():
        return record.sample_recording(model, 0, steps, cfg, sampler, scheduler, positive, negative, latent)[0]

    return {"KSampler": plain, "KSampler (Record Attention)": recording}


def run(args, model):
    positive, negative = random_conditioning(seed=1), random_conditioning(seed=2)
    for size, steps in ((256, args.steps_256), (512, args.steps_512)):
        if steps < 1:  # --steps-512 0 skips that size
            continue
        latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
        medians, runs = interleaved(variants(model, positive, negative, latent, steps), args.repeats)
        report(f"record attention, SD1.5 full size, {size} px, {steps} steps, batch 1, CFG", medians,
               "KSampler", target=1.05)
        for name, values in runs.items():
            print(f"  {name:<28} runs: {', '.join(f'{v:.2f}' for v in values)} s")

    print("\n## recorded-map memory (SD1.5 full size, 64 px latent 8x8, level 2)")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    for steps in (10, 50):
        patched = model.clone()
        recorder = recorder_mod.AttentionRecorder()
        sigmas = common.schedule(patched, steps, "euler", "normal", 1.0)
        recorder.install(patched, (8, 8), sigmas)
        with torch.inference_mode():
            common.ksample(patched, 0, steps, 7.5, "euler", "normal", positive, negative, latent, sigmas)
        print(f"  {steps:>3} steps: {recorder.total.numel() * recorder.total.element_size()} bytes "
              f"of maps ({recorder.count} layer-steps summed)")
