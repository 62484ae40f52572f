"""FoI on the DiT instruction-editing models (Flux Kontext, Qwen-Image-Edit) on the real ComfyUI host:
tiny random-weight models from ComfyUI's classes given a reference latent through the cond's
`reference_latents` (what ReferenceLatent / TextEncodeQwenImageEdit put there), sampled through
ComfyUI's own samplers with the FoI guider. A planted keyword-region bias (ae_testlib.dit_plant)
must come back as the keyword's mask; the guided prediction must be the no-edit branch outside
the masks and the instruction inside."""
import pytest
import torch

from ae_testlib import dit_host, dit_plant
from ae_testlib.pack import pack_module

foi_dit = pack_module("samplers.foi_dit")
attn = pack_module("attention.foi_dit")
instructions_mod = pack_module("attention.instructions")
tokens_mod = pack_module("attention.tokens")
common = pack_module("samplers.common")

FAMILIES = {"kontext": "flux", "qwen_edit": "qwen"}
WORDS = "put a hat on the dog and make the sky red".split()
N_TOKENS = 12  # the words plus two padding / end tokens


@pytest.fixture(autouse=True)
def _dit_host(comfy_host):
    dit_host.require_dit_host()


def instructions(keywords=("hat",)):
    """Instructions over WORDS (one token per word) with one sub-instruction per keyword."""
    strings = WORDS + ["<end>"] * (N_TOKENS - len(WORDS))
    words = [tokens_mod.Word(w, (i,)) for i, w in enumerate(WORDS)]
    tokens = tokens_mod.PromptTokens(text=" ".join(WORDS), token_strings=strings, words=words)
    cut = WORDS.index("and")
    spans = {"hat": tuple(range(0, cut)), "dog": tuple(range(0, cut)), "sky": tuple(range(cut + 1, len(WORDS))),
             "red": tuple(range(cut + 1, len(WORDS)))}
    subs = [instructions_mod.SubInstruction(kw, kw, spans[kw], (WORDS.index(kw),)) for kw in keywords]
    return instructions_mod.Instructions(text=tokens.text, tokens=tokens, subinstructions=subs)


def conds(kind, insts, batch=1, ref_hw=(8, 8), null_tokens=None, seed=1):
    """(positive, negative) as Kontext / Qwen-Image-Edit get them: both with the reference latent."""
    ref = torch.randn(1, 16, *ref_hw, generator=torch.Generator().manual_seed(7))
    if kind == "qwen_edit":
        ref = ref[:, :, None]  # Qwen-Image's VAE (Wan 2.1) encodes images as one-frame videos
    extra = {"reference_latents": [ref]}
    if kind == "kontext":
        extra["guidance"] = 2.5
    positive = dit_host.conditioning(N_TOKENS, seed, **extra)
    positive = instructions_mod.annotate_instructions(positive, insts)
    negative = dit_host.conditioning(null_tokens or (N_TOKENS if kind == "kontext" else 5), seed + 1, **extra)
    return positive, negative


def run(model, positive, negative, latent, config, steps=3, seed=0):
    with torch.inference_mode():
        out, guider = foi_dit.sample_foi_dit(model, positive, negative, latent, seed, steps, "euler", "simple",
                                             1.0, config)
    return out["samples"], guider


def planted_model(kind, region, keyword_columns, beta=8.0):
    return dit_plant.plant(dit_host.model(FAMILIES[kind]), region, keyword_columns, beta=beta,
                           branches=(attn.INSTRUCTION,))


@pytest.mark.parametrize("kind", list(FAMILIES))
@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_planted_region_is_the_keyword_mask(kind, hw):
    grid = attn.token_grid(hw)
    region = torch.stack([dit_plant.region_mask(grid, slice(1, 5), slice(2, 6)),
                          dit_plant.region_mask(grid, slice(3, 8), slice(0, 4))])
    model = planted_model(kind, region, [WORDS.index("hat")])
    positive, negative = conds(kind, instructions(("hat",)))
    _, guider = run(model, positive, negative, dit_host.latent("flux", 2, *hw), foi_dit.FoIDiTConfig(), steps=2)
    masks = guider.masks
    assert masks.shape == (2, 1, *grid)
    for b in range(2):
        assert dit_plant.iou(masks[b, 0] > 0.5, region[b]) >= 0.9, (b, masks[b, 0], region[b])
