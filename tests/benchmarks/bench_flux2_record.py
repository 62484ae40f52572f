"""Recording on Flux.2: KSampler (Record Attention) vs plain sampling on full-width Flux.2 [dev]
blocks (hidden 6144, 48 heads of 128, MLP 3x SiLU-gated, global modulation, Mistral context 3 x
5120 = 15360 wide: a 40-token prompt left-padded to 512 by model_base.Flux2), one double and one
single block, random weights, CPU, PyTorch attention, cfg 1. Flux.2's patch 1 on its 128-channel
latent: 1024 px = a 64 x 64 latent = 4096 image tokens (as Flux.1's 1024 px). The timing and
memory boilerplate is recording_cost.compare."""
import time

import torch

from recording_cost import compare
from ae_testlib import dit_host

OWN_MODEL = True  # run.py: this benchmark builds its own model
PROMPT_TOKENS = 40  # a short prompt in ComfyUI's Flux.2 [dev] template
CONTEXT = 3 * 5120  # Mistral-Small-3.1 layers 10, 20, 30 joined on channels
FULL = {"hidden_size": 6144, "num_heads": 48, "mlp_ratio": 3.0, "context_in_dim": CONTEXT, "depth": 1,
        "depth_single_blocks": 1}


def build():
    """Full-width Flux.2 [dev] through the host's own detection and supported_models.Flux2."""
    import comfy.model_patcher

    start = time.perf_counter()
    model_config = dit_host.supported_config("flux", "tiny", "flux2", {**FULL, "axes_dim": [32, 32, 32, 32]})
    model = model_config.get_model({})
    dit_host._init(model, 0)
    model.eval()
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    print(f"built full-width Flux.2 [dev] (1 double + 1 single block) in {time.perf_counter() - start:.1f} s")
    return patcher


def _conditioning(seed):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, PROMPT_TOKENS, CONTEXT, generator=generator) * 0.1, {"guidance": 4.0}]]


def run(args, model=None):
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.modules import attention

    flux_math.optimized_attention = attention.attention_pytorch  # bound at import, as setup() does globally
    model = model or build()
    positive, negative = _conditioning(1), _conditioning(2)
    for size in (int(s) for s in args.flux2_sizes.split(",")):
        latent = {"samples": torch.zeros(1, 128, size // 16, size // 16)}
        compare(f"Flux.2 recording, full-width Flux.2 [dev] blocks, {size} px", model, positive, negative, latent,
                args.dit_steps, args.repeats, ("text",))
