"""Qwen-Image-Edit 2509 / 2511 with one, two and three reference images of different sizes
(TextEncodeQwenImageEditPlus's `reference_latents`, one latent per image). The model appends
every reference image's tokens after the generated image's ([text | generated | ref 1 | ref 2 |
ref 3]); 2511 (`index_timestep_zero`, 0.19.3) runs them at timestep 0. Recording and FoI read the
generated image's rows only; the reference tokens of every image stay keys.

Tiny-width Qwen-Image models at the real block count (60, the default blocks 47-57) from the
host's own model detection (ae_testlib.dit_host), three weight seeds, a word planted on a
different region per batch image (ae_testlib.dit_plant), a non-square latent."""
import pytest
import torch

import test_dit_record as rec
import test_foi_dit as foi
from ae_testlib import dit_host, dit_plant, host
from ae_testlib.pack import pack_module

families = pack_module("attention.families")
foi_dit = pack_module("samplers.foi_dit")
instructions_mod = pack_module("attention.instructions")
record_nodes = pack_module("nodes.record")

# reference latents of three sizes ([1, 16, 1, h, w]: Qwen-Image's VAE encodes one-frame videos)
REFERENCE_HW = ((8, 8), (6, 10), (4, 14))
LATENT_HW = (12, 20)  # non-square: a 6 x 10 token grid
VARIANTS = [pytest.param(None, id="2509"),
            pytest.param("edit_2511", id="2511", marks=host.requires("index_timestep_zero"))]
SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _dit_host(comfy_host):
    dit_host.require_dit_host()


def references(n):
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(1, 16, 1, *hw, generator=generator) for hw in REFERENCE_HW[:n]]


def regions(grid):
    """A different region per batch image [2, gh, gw]."""
    return torch.stack([dit_plant.region_mask(grid, slice(1, 4), slice(1, 5)),
                        dit_plant.region_mask(grid, slice(2, 6), slice(5, 9))])


def model(variant, seed):
    built = dit_host.build("qwen", seed, real_depth=True, variant=variant)
    if variant:
        assert built.model.diffusion_model.default_ref_method == "index_timestep_zero"
    return built


def default_block_calls(calls, diffusion_model):
    """The spy's calls in the default blocks: Qwen-Image makes one attention call per block, in
    block order, so a forward's calls are its blocks 0..59."""
    depth = len(diffusion_model.transformer_blocks)
    chosen = {i for _, i in families.default_blocks(families.FAMILIES[
        "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel"], diffusion_model)}
    assert len(calls) % depth == 0
    return [call for index, call in enumerate(calls) if index % depth in chosen]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_refs", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_recording_with_several_reference_images(variant, n_refs, seed):
    """KSampler (Record Attention) with the default blocks: the maps are the generated image's
    rows only and equal a float64 brute force (under an override already on the model and
    without one); the word's Attention Mask is its planted region (IoU >= 0.9) in each batch
    image; the sampled latent is bit-identical to plain sampling."""
    grid = families.token_grid(LATENT_HW)
    region = regions(grid)
    word = rec.PLANT_WORDS.index("cat")
    base = model(variant, seed)
    planted = dit_plant.plant(base, region, [word], beta=8.0, branches=(0,))
    refs = {"reference_latents": references(n_refs)}
    positive = dit_host.conditioning(rec.N_TOKENS, seed=1, tokens=rec.plant_tokens(), **refs)
    negative = dit_host.conditioning(rec.N_TOKENS, seed=2, **refs)
    latent = dit_host.latent("qwen", 2, *LATENT_HW)

    spy = rec.SpyOverride()
    out, maps = rec.recording(rec.with_override(planted, spy), positive, negative, latent)
    n_img = grid[0] * grid[1]
    assert all(k.shape[2] > rec.N_TOKENS + n_img for _, k, *_ in spy.calls)  # the references are keys
    expected = rec.brute_force(default_block_calls(spy.calls, base.model.diffusion_model), rec.N_TOKENS, n_img,
                               normalise="text")
    assert maps.probs.shape == (2, *grid, rec.N_TOKENS)
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert torch.equal(out, rec.plain(rec.with_override(planted, rec.SpyOverride()), positive, negative, latent))
    fused_out, fused_maps = rec.recording(planted, positive, negative, latent)
    assert torch.allclose(fused_maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert torch.equal(fused_out, rec.plain(planted, positive, negative, latent))

    mask = record_nodes.AttentionMask().run(fused_maps, "cat", record_nodes.DEFAULT_BLUR,
                                            record_nodes.DEFAULT_THRESHOLD, "union")[0]  # the node's defaults
    pixels = region.repeat_interleave(16, 1).repeat_interleave(16, 2)  # a token is 2 x 2 latent = 16 x 16 px
    ious = [dit_plant.iou(mask[b] > 0.5, pixels[b]) for b in range(2)]
    print(f"recording iou variant={variant or '2509'} refs={n_refs} seed={seed}: {ious}")
    assert min(ious) >= 0.9, ious


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_refs", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_foi_with_several_reference_images(variant, n_refs, seed):
    """FoI Sampler (Kontext / Qwen-Image-Edit) with the default mask blocks: the keyword's mask
    is on the generated image, its planted region in each batch image (IoU >= 0.8); every
    instruction call is modulated with the reference tokens as keys."""
    grid = families.token_grid(LATENT_HW)
    region = regions(grid)
    planted = dit_plant.plant(model(variant, seed), region, [foi.WORDS.index("hat")], beta=8.0,
                              branches=(foi.INSTRUCTION["qwen_edit"],))
    refs = {"reference_latents": references(n_refs)}
    positive = instructions_mod.annotate_instructions(dit_host.conditioning(foi.N_TOKENS, 1, **refs),
                                                      foi.instructions(("hat",)))
    negative = dit_host.conditioning(5, 2, **refs)  # the empty instruction: shorter, one forward each
    _, guider = foi.run(planted, positive, negative, dit_host.latent("qwen", 2, *LATENT_HW),
                        foi_dit.FoIDiTConfig(), steps=2)
    assert guider.masks.shape == (2, 1, *grid)
    ious = [dit_plant.iou(guider.masks[b, 0] > 0.5, region[b]) for b in range(2)]
    print(f"foi iou variant={variant or '2509'} refs={n_refs} seed={seed}: {ious}")
    assert min(ious) >= 0.8, ious
    assert guider.state.stats["modulated"] > 0 and guider.state.stats["skipped"] == 0


def test_plus_encode_nodes_with_two_images_end_to_end():
    """The Plus encode nodes on Qwen-Image's real tokenizer (tiny Qwen2.5-VL) with two images of
    different sizes, each image's reference latent added as its VAE would: KSampler (Record
    Attention) -> Attention Mask finds the word planted on its region past both images' vision
    tokens, and FoI's keyword mask is its region; the reference tokens stay keys."""
    from ae_testlib import dit_text

    dit_text.require_dit_clip("qwen_image")
    clip = dit_text.build_dit_clip("qwen_image")
    nodes_encode, nodes_foi = pack_module("nodes.encode"), pack_module("nodes.foi")
    tokens_mod = pack_module("attention.tokens")
    generator = torch.Generator().manual_seed(0)
    images = {"image1": torch.rand(1, 300, 500, 3, generator=generator),
              "image2": torch.rand(1, 256, 200, 3, generator=generator)}
    refs = {"reference_latents": references(2)}
    add = lambda conds: [[c, {**d, **refs}] for c, d in conds]  # noqa: E731
    grid = families.token_grid(LATENT_HW)
    region = regions(grid)
    latent = dit_host.latent("qwen", 2, *LATENT_HW)
    with torch.inference_mode():
        positive = add(nodes_encode.AttentionTextEncodeQwenImageEditPlus().run(clip, "a cat on grass", **images)[0])
        negative = add(nodes_encode.AttentionTextEncodeQwenImageEditPlus().run(clip, "", **images)[0])
        instruction, null = nodes_foi.InstructionTextEncodeQwenImageEditPlus().run(clip, "put a *hat* on the dog",
                                                                                   **images)
    cat = tokens_mod.tokens_of(positive).positions("cat")
    assert len([part for part in tokens_mod.tokens_of(positive).parts if part[0] == "vision"]) == 2
    planted = dit_plant.plant(dit_host.model("qwen"), region, cat, beta=8.0, branches=(0,))
    _, maps = rec.recording(planted, positive, negative, latent, dit_blocks="all")
    assert maps.probs.shape[:3] == (2, *grid)
    mask = record_nodes.AttentionMask().run(maps, "cat", record_nodes.DEFAULT_BLUR,
                                            record_nodes.DEFAULT_THRESHOLD, "union")[0]
    pixels = region.repeat_interleave(16, 1).repeat_interleave(16, 2)
    assert min(dit_plant.iou(mask[b] > 0.5, pixels[b]) for b in range(2)) >= 0.9

    instruction, null = add(instruction), add(null)
    hat = instructions_mod.instructions_of(instruction).keyword_positions[0]
    # +12: at +8 the random encoder's ~400 vision-token keys compete unevenly inside the region
    # and Eq. 2 keeps only its top tokens (IoU 0.31, one image or two alike; docs/foi.md)
    planted = dit_plant.plant(dit_host.model("qwen"), region, hat, beta=12.0,
                              branches=(foi.INSTRUCTION["qwen_edit"],))
    _, guider = foi.run(planted, instruction, null, latent, foi_dit.FoIDiTConfig(mask_blocks="all"), steps=2)
    assert min(dit_plant.iou(guider.masks[b, 0] > 0.5, region[b]) for b in range(2)) >= 0.8
    assert guider.state.stats["modulated"] > 0 and guider.state.stats["skipped"] == 0
