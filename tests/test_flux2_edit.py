"""InstDiffEdit and FoI on Flux.2 (ComfyUI >= 0.3.72; 0.3.64 skips with the host reason): tiny
random-weight Flux.2 models from the host's own detection (patch 1 on 128-channel latents,
text left-padded to 512), the real word layout of Flux.2 [dev]'s Mistral prompt (tekken reader)
with random embeddings on it, and a planted word <-> region bias the methods must find."""
import math

import pytest
import torch

from ae_testlib import dit_host, dit_plant, dit_text, host
from ae_testlib.pack import pack_module

import test_foi_dit as foi_test

pytestmark = host.requires("flux2")

ide = pack_module("samplers.instdiffedit")
capture_mod = pack_module("samplers.instdiffedit_capture")
tokens_mod = pack_module("attention.tokens")
text_encoders = pack_module("attention.text_encoders")
ide_nodes = pack_module("nodes.instdiffedit")
foi_dit = pack_module("samplers.foi_dit")
attn = pack_module("attention.foi_dit")
instructions_mod = pack_module("attention.instructions")

PROMPT = "a photo of a cat on grass"
COPIES = 3
SHARE = 0.9


@pytest.fixture(autouse=True)
def _dit_host(comfy_host):
    dit_host.require_dit_host()


@pytest.fixture(scope="module")
def prompt_tokens(comfy_host):
    dit_text.require_dit_clip("flux2")
    return text_encoders.prompt_tokens(dit_text.build_dit_clip("flux2"), PROMPT)


@pytest.fixture(scope="module")
def real_depth_models(comfy_host):
    return {seed: dit_host.build("flux", seed=seed, variant="flux2", real_depth=True) for seed in (0, 1, 2)}


def regions_for(grid):
    first = dit_plant.region_mask(grid, slice(2, 8), slice(3, 9))
    second = dit_plant.region_mask(grid, slice(5, 11), slice(grid[1] // 2 - 1, grid[1] - 2))
    return torch.stack([first, second])


def plant_beta(tokens, share=SHARE):
    words = len(tokens.positions("cat"))
    return math.log(share / (1 - share) * (tokens.n_tokens - words) / words)


def edit(model, tokens, regions, share=SHARE, seed=1, copies=COPIES):
    planted = dit_plant.plant(model, regions.repeat_interleave(copies, 0), tokens.positions("cat"),
                              beta=plant_beta(tokens, share))
    positive = dit_host.conditioning(tokens.n_tokens, seed, tokens=tokens)
    negative = dit_host.conditioning(4, seed + 50)
    source = {"samples": torch.randn(2, 128, *regions.shape[1:], generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        return ide.sample_instdiffedit(planted, positive, negative, source, seed, steps=8, strength=0.5, cfg=1.0,
                                       sampler_name="euler", scheduler="normal", copies=copies)


def cat_index(tokens):
    return 1 + [tokens_mod.normalise_word(w.text) for w in tokens.words].index("cat")


@pytest.mark.parametrize("seed,share,depth", [(0, 0.9, "real"), (1, 0.9, "real"), (2, 0.9, "real"),
                                              (0, 0.99, "2 + 2"), (1, 0.5, "2 + 2")])
def test_instdiffedit_finds_the_planted_region(real_depth_models, prompt_tokens, seed, share, depth):
    """Flux.2 [dev] at its 8 + 48 blocks (tiny width; other strengths on 2 + 2 blocks), a
    non-square 12 x 17 latent (one token per cell), batch 2 with a different region per image, the
    real Mistral layout (the template's tokens of no word are the start map): each image's final
    mask is its region (IoU >= 0.8)."""
    regions = regions_for((12, 17))
    model = real_depth_models[seed] if depth == "real" else dit_host.build("flux", seed=seed, variant="flux2")
    result = edit(model, prompt_tokens, regions, share, copies=2)
    assert result.mask.shape == (2, 12, 17) and result.pixel_scale == 16
    assert result.index.tolist() == [cat_index(prompt_tokens)] * 2
    for image in range(2):
        assert dit_plant.iou(result.mask[image], regions[image]) >= 0.8


def test_instdiffedit_node_mask_is_16x_the_latent(prompt_tokens):
    regions = regions_for((12, 17))
    model = dit_host.model("flux", "flux2")
    planted = dit_plant.plant(model, regions.repeat_interleave(COPIES, 0), prompt_tokens.positions("cat"),
                              beta=plant_beta(prompt_tokens))
    positive = dit_host.conditioning(prompt_tokens.n_tokens, 1, tokens=prompt_tokens)
    negative = dit_host.conditioning(4, 51)
    source = {"samples": torch.randn(2, 128, 12, 17, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        latent, mask, strip = ide_nodes.InstDiffEdit().run(planted, positive, negative, source, 1, 8, 0.5, 1.0,
                                                           "euler", "normal", COPIES, 0.9, 0.6, 0.2,
                                                           "official (step's sigma)")
    assert latent["samples"].shape == (2, 128, 12, 17)
    assert mask.shape == (2, 16 * 12, 16 * 17)
    for image in range(2):
        expected = regions[image].repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert dit_plant.iou(mask[image] > 0.5, expected) >= 0.8


def test_instdiffedit_mask_from_recorded_flux2_maps(prompt_tokens):
    """InstDiffEdit Mask on maps from KSampler (Record Attention) on Flux.2: the maps are at the
    latent (level 0), the mask 16x the latent."""
    record = pack_module("samplers.record")
    regions = regions_for((12, 17))
    model = dit_plant.plant(dit_host.model("flux", "flux2"), regions, prompt_tokens.positions("cat"),
                            beta=plant_beta(prompt_tokens))
    positive = dit_host.conditioning(prompt_tokens.n_tokens, 1, tokens=prompt_tokens)
    with torch.inference_mode():
        _, maps = record.sample_recording(model, 1, 2, 1.0, "euler", "normal", positive,
                                          dit_host.conditioning(4, 2), {"samples": torch.zeros(2, 128, 12, 17)})
    assert maps.level == 0
    mask = ide_nodes.InstDiffEditMask().run(maps, 0.9, 0.6, 0.2)[0]
    assert mask.shape == (2, 16 * 12, 16 * 17)
    for image in range(2):
        expected = regions[image].repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert dit_plant.iou(mask[image] > 0.5, expected) >= 0.8


# ---------------------------------------------------------------- FoI on Flux.2's reference editing

def foi_conds(insts, null_tokens=5, seed=1, references=1):
    """(instruction, null) as ReferenceLatent + FluxGuidance give them: reference latent(s) in both;
    the null shorter than the instruction (each left-padded to 512 by its own length)."""
    refs = [torch.randn(1, 128, 8, 8 + 2 * i, generator=torch.Generator().manual_seed(7 + i)) for i in range(references)]
    extra = {"reference_latents": refs, "guidance": 4.0}
    positive = instructions_mod.annotate_instructions(
        dit_host.conditioning(foi_test.N_TOKENS, seed, **extra), insts)
    return positive, dit_host.conditioning(null_tokens, seed + 1, **extra)


def planted_foi(model, region, keyword):
    return dit_plant.plant(model, region, [foi_test.WORDS.index(keyword)], beta=8.0,
                           branches=(attn.INSTRUCTION_FIRST["instruction"],))


@pytest.mark.parametrize("seed,references", [(0, 1), (1, 2), (2, 1)])
def test_foi_keyword_mask_is_the_planted_region(real_depth_models, seed, references):
    """FoI on Flux.2 reference editing: the keyword mask (on the generated image, the reference
    tokens staying keys) is the planted region, per image, at the real block count, a non-square
    latent, one and two reference images."""
    hw = (8, 12)  # Flux.2: the token grid is the latent
    region = torch.stack([dit_plant.region_mask(hw, slice(1, 5), slice(2, 6)),
                          dit_plant.region_mask(hw, slice(3, 7), slice(6, 11))])
    model = planted_foi(real_depth_models[seed], region, "hat")
    positive, negative = foi_conds(foi_test.instructions(("hat",)), references=references)
    _, guider = foi_test.run(model, positive, negative, {"samples": torch.zeros(2, 128, *hw)},
                             foi_dit.FoIDiTConfig(), steps=2)
    assert guider.model.name == "Flux.2" and guider.state.branches == attn.INSTRUCTION_FIRST
    assert guider.masks.shape == (2, 1, *hw)
    for b in range(2):
        assert dit_plant.iou(guider.masks[b, 0] > 0.5, region[b]) >= 0.8
    assert guider.state.stats["modulated"] > 0 and guider.state.stats["skipped"] == 0


def test_foi_guidance_is_no_edit_outside_and_instruction_inside():
    hw = (8, 12)
    region = torch.stack([dit_plant.region_mask(hw, slice(1, 4), slice(1, 5))] * 2)
    model = planted_foi(dit_host.model("flux", "flux2"), region, "hat")
    positive, negative = foi_conds(foi_test.single_word_instructions(("hat",)))
    calls, guider = foi_test.captured_run(model, positive, negative, {"samples": torch.zeros(2, 128, *hw)},
                                          foi_dit.FoIDiTConfig(s_T=1.0), steps=3)
    assert calls[0]["foi_union"] is None
    union = calls[1]["foi_union"]
    assert union is not None and torch.equal(union[:, 0] > 0.5, region)  # patch 1: the grid is the latent
    inside = union.expand_as(calls[1]["denoised"]) > 0.5
    assert torch.allclose(calls[1]["denoised"][inside], calls[1]["cond_denoised"][inside], atol=1e-5)
    assert torch.allclose(calls[1]["denoised"][~inside], calls[1]["uncond_denoised"][~inside], atol=1e-5)


def test_foi_node_masks_are_16x_the_latent():
    nodes_foi = pack_module("nodes.foi")
    hw = (8, 12)
    region = torch.stack([dit_plant.region_mask(hw, slice(1, 5), slice(2, 6))] * 2)
    model = planted_foi(dit_host.model("flux", "flux2"), region, "hat")
    positive, negative = foi_conds(foi_test.instructions(("hat",)))
    with torch.inference_mode():
        latent, masks, preview = nodes_foi.FoIDiTSampler().run(
            model, positive, negative, {"samples": torch.zeros(2, 128, *hw)}, 0, 2, "euler", "simple", 1.0,
            0.0, 1.0, 3, 0.5, 3, 0.5, 8, True, "1.0", 0.75, "")
    assert masks.shape == (2, 16 * hw[0], 16 * hw[1])
    expected = region[0].repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert dit_plant.iou(masks[0] > 0.5, expected) >= 0.8


@pytest.fixture(scope="module")
def klein_tokens(comfy_host):
    dit_text.require_dit_clip("klein")
    return text_encoders.prompt_tokens(dit_text.build_dit_clip("klein"), PROMPT)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instdiffedit_on_klein(klein_tokens, seed):
    """Flux.2 [klein] 4B at its 5 + 20 blocks: Qwen3's prompt comes padded to 512 by its tokenizer
    (no left padding), so the tokens of no word are its chat template and that padding; the start
    map they make finds each image's region (IoU >= 0.8, the right word), as on [dev]."""
    regions = regions_for((12, 17))
    model = dit_host.build("flux", seed=seed, variant="klein", real_depth=True)
    result = edit(model, klein_tokens, regions, copies=2)
    assert klein_tokens.n_tokens == 512
    assert result.index.tolist() == [cat_index(klein_tokens)] * 2
    for image in range(2):
        assert dit_plant.iou(result.mask[image], regions[image]) >= 0.8
