"""FoI Sampler vs plain InstructPix2Pix 3-branch sampling (core DualCFGGuider) at equal steps.

Both run the same schedule (steps at denoise 0.8, euler_ancestral) from the same source latent with
the same three branches in one UNet call per step, so the ratio is FoI's own cost: recording the
1/4 layers at the first step, the Eq. 2 masks, the explicit modulated attention of the instruction
branch on every cross-attention layer, and the masked guidance. Target <= 1.10x.

    python tests/benchmarks/run.py --only foi [--repeats 3 --steps-256 4 --steps-512 2]

Standalone (builds its own model): python tests/benchmarks/bench_foi.py [--size tiny|full]
"""
import argparse
import time

import torch

from common import host, interleaved, pack_module, random_conditioning, report, setup

IP2P = True  # run.py builds the full-size SD1.5-IP2P UNet for this benchmark

DENOISE, S_T, S_I = 0.8, 7.5, 1.5
SAMPLER, SCHEDULER = "euler_ancestral", "normal"
INSTRUCTION = "put a *hat* on the dog; make the *sky* a sunset"


def _dual_cfg_class():
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    return Guider_DualCFG


def _conds(context_dim, source):
    instructions = pack_module("attention.instructions")
    parsed = instructions.parse_instructions(host.build_clip("sd15"), INSTRUCTION)
    positive = instructions.annotate_instructions(random_conditioning(dim=context_dim, seed=1), parsed)
    negative = random_conditioning(dim=context_dim, seed=2)
    with_image = lambda conds: [[c, {**o, "concat_latent_image": source}] for c, o in conds]  # noqa: E731
    return with_image(positive), with_image(negative), negative


def variants(model, source, steps):
    """{name: run} of core DualCFGGuider (3 branches) and the FoI Sampler from `source` on the same
    schedule (also tests/device/run.py). Returns (variants, sigmas)."""
    import comfy.samplers

    foi = pack_module("samplers.foi")
    common = pack_module("samplers.common")
    context_dim = model.model.model_config.unet_config["context_dim"]
    positive, negative, no_image = _conds(context_dim, source)
    sigmas = common.schedule(model, steps, SAMPLER, SCHEDULER, DENOISE)
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(3))
    latent = {"samples": torch.zeros_like(source)}

    def dual_cfg():
        guider = _dual_cfg_class()(model)
        guider.set_conds(positive, negative, no_image)
        guider.set_cfg(S_T, S_I)
        return guider.sample(noise, source, comfy.samplers.sampler_object(SAMPLER), sigmas, seed=0)

    def foi_sampler():
        return foi.sample_foi(model, positive, negative, latent, 0, steps, DENOISE, SAMPLER, SCHEDULER,
                              foi.FoIConfig(s_T=S_T, s_I=S_I), callback=lambda *a: None)[0]

    return {"IP2P DualCFGGuider": dual_cfg, "FoI Sampler": foi_sampler}, sigmas


def run(args, model=None, sizes=None):
    if model is None:
        model = host.build_model("sd15", ip2p=True, size=getattr(args, "size", "full"))
    sizes = sizes or ((256, args.steps_256), (512, args.steps_512))
    for size, steps in sizes:
        if steps < 1:
            continue
        source = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        runs, sigmas = variants(model, source, steps)
        medians, times = interleaved(runs, args.repeats)
        report(f"FoI, SD1.5-IP2P {size} px, {len(sigmas) - 1} steps (denoise {DENOISE}), {SAMPLER}, "
               f"2 sub-instructions, batch 1 x 3 branches", medians, "IP2P DualCFGGuider", target=1.10)
        for name, values in times.items():  # every run, in order: shows how noisy the machine was
            print(f"  {name:<28} runs: {', '.join(f'{v:.2f}' for v in values)} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-256", type=int, default=4)
    parser.add_argument("--steps-512", type=int, default=2)
    args = parser.parse_args()
    print(f"host: {setup()}")
    start = time.perf_counter()
    model = host.build_model("sd15", ip2p=True, size=args.size)
    print(f"built {args.size} SD1.5 IP2P UNet in {time.perf_counter() - start:.1f} s")
    run(args, model)


if __name__ == "__main__":
    main()
