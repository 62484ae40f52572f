"""FoI on DiT editing models vs the same number of model evaluations without FoI, on full-width blocks.

Flux Kontext: full-width Flux (hidden 3072, 24 heads, T5 context 4096 wide, 256 text tokens) with one
double and one single block, a reference latent of the image's size (ReferenceLatent), FluxGuidance
2.5. FoI runs two branches per step (instruction, null instruction, batched in one forward); the
baseline is KSampler's CFG with the same two conds (cfg 1.5: two evaluations per step, batched).
Qwen-Image-Edit: full-width Qwen-Image blocks (hidden 3072 = 24 heads x 128, context 3584 wide) with
one joint block, the instruction 64 tokens and the null 32 (different lengths: ComfyUI runs one
forward per branch, as with the real encoder); FoI vs KSampler cfg 2.5, both two evaluations per step.
Random weights, CPU, PyTorch attention. The variants alternate; medians of wall time and of the
sampling thread's CPU time are compared (target FoI <= 1.10x).
"""
import statistics
import time

import torch

from common import cpu_timed, interleaved, pack_module, report
from ae_testlib import dit_host

common = pack_module("samplers.common")
foi_dit = pack_module("samplers.foi_dit")
instructions_mod = pack_module("attention.instructions")
tokens_mod = pack_module("attention.tokens")

OWN_MODEL = True  # run.py: this benchmark builds its own models


def build_kontext():
    model = dit_host.build("flux", size="full")
    model.model.diffusion_model.double_blocks = model.model.diffusion_model.double_blocks[:1]
    model.model.diffusion_model.single_blocks = model.model.diffusion_model.single_blocks[:1]
    return model


def build_qwen():
    model = dit_host.build("qwen", size="full")
    model.model.diffusion_model.transformer_blocks = model.model.diffusion_model.transformer_blocks[:1]
    return model


def _instructions(n_tokens):
    words = [tokens_mod.Word(f"w{i}", (i,)) for i in range(8)]
    tokens = tokens_mod.PromptTokens(text=" ".join(w.text for w in words),
                                     token_strings=[w.text for w in words] + ["<pad>"] * (n_tokens - 8), words=words)
    subs = [instructions_mod.SubInstruction("w0 w1 w2", "w1", (0, 1, 2), (1,)),
            instructions_mod.SubInstruction("w4 w5 w6", "w5", (4, 5, 6), (5,))]
    return instructions_mod.Instructions(text=tokens.text, tokens=tokens, subinstructions=subs)


def _conds(width, n_inst, n_null, ref, extra):
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, n_inst, width, generator=generator), {"reference_latents": [ref], **extra}]]
    negative = [[torch.randn(1, n_null, width, generator=generator), {"reference_latents": [ref], **extra}]]
    return instructions_mod.annotate_instructions(positive, _instructions(n_inst)), negative


def _pytorch_attention():
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.modules import attention

    flux_math.optimized_attention = attention.attention_pytorch


def variants(model, positive, negative, size, steps, cfg, five_d=False):
    """{name: run} of KSampler at `cfg` (two evaluations per step) and FoI with the same two
    branches (also tests/device/run.py); each returns its LATENT. Returns (variants, evaluations):
    evaluations["FoI"] gets the last FoI run's evaluation count and hook counters."""
    shape = (1, 16, 1, size // 8, size // 8) if five_d else (1, 16, size // 8, size // 8)
    latent = {"samples": torch.zeros(*shape)}
    sigmas = common.schedule(model, steps, "euler", "simple", 1.0)
    evaluations = {}

    def plain():
        return common.ksample(model, 0, steps, cfg, "euler", "simple", positive, negative, latent, sigmas)

    def foi():
        out, guider = foi_dit.sample_foi_dit(model, positive, negative, latent, 0, steps, "euler", "simple", 1.0,
                                             foi_dit.FoIDiTConfig(s_T=cfg if cfg != 1.5 else 1.0))
        evaluations["FoI"] = (guider.evaluations, dict(guider.state.stats))
        return out

    return {"same evaluations, no FoI": plain, "FoI": foi}, evaluations


def bench(title, model, positive, negative, size, steps, cfg, repeats, five_d=False):
    runs, evaluations = variants(model, positive, negative, size, steps, cfg, five_d)
    timed, cpu = cpu_timed(runs)
    medians, runs = interleaved(timed, repeats)
    report(f"{title}, {size} px, {steps} steps", medians, "same evaluations, no FoI", target=1.10)
    for name, values in runs.items():
        print(f"  {name:<28} runs: {', '.join(f'{v:.2f}' for v in values)} s")
    report("same runs, CPU time of the sampling thread", {n: statistics.median(v) for n, v in cpu.items()},
           "same evaluations, no FoI", target=1.10)
    print(f"  FoI model evaluations, hook counters: {evaluations['FoI']}")


def run(args, model=None):
    _pytorch_attention()
    size, steps = args.foi_dit_size, args.foi_dit_steps
    start = time.perf_counter()
    kontext = build_kontext()
    print(f"built full-width Flux (1 double + 1 single block) in {time.perf_counter() - start:.1f} s")
    ref = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    positive, negative = _conds(4096, 256, 256, ref, {"guidance": 2.5, "pooled_output": torch.zeros(1, 768)})
    bench("FoI on Flux Kontext (full-width blocks), vs KSampler cfg 1.5 (2 evaluations per step)", kontext,
          positive, negative, size, steps, 1.5, args.repeats)
    del kontext
    start = time.perf_counter()
    qwen = build_qwen()
    print(f"built full-width Qwen-Image (1 joint block) in {time.perf_counter() - start:.1f} s")
    positive, negative = _conds(3584, 64, 32, ref[:, :, None], {})
    bench("FoI on Qwen-Image-Edit (full-width block), vs KSampler cfg 2.5 (2 evaluations per step)", qwen,
          positive, negative, size, steps, 2.5, args.repeats, five_d=False)
