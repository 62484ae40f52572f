"""Recording on Flux.2 ([dev], [klein]): tiny random-weight models built by the host's own
detection of Flux.2 checkpoints (Flux's class, patch size 1 on 128-channel latents, global
modulation, 4-axis RoPE, text left-padded to 512 by model_base.Flux2). Maps equal a float64 brute
force, the sampled latent is bit-identical, planted regions come back (IoU >= 0.9), other patches
keep working; reference images (Flux.2's built-in editing) are keys, not queries."""
import pytest
import torch

from ae_testlib import dit_host, dit_plant, host
from ae_testlib.pack import pack_module

import test_dit_record as rec

pytestmark = host.requires("flux2")

families = pack_module("attention.families")
nodes = pack_module("nodes.record")
N_TOKENS = 7
CHANNELS = 128  # Flux.2's latent
TEXT_LEN = 512  # model_base.Flux2 left-pads the conditioning to this


@pytest.fixture(autouse=True)
def _dit_host(comfy_host):
    dit_host.require_dit_host()


def latent(batch=1, height=6, width=10):
    return {"samples": torch.zeros(batch, CHANNELS, height, width)}


def reference_options(reference):
    # ReferenceLatent's cond key: Flux.2 appends the reference's tokens after the image's
    return {"reference_latents": [torch.randn(1, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(5))]} \
        if reference else {}


def brute_force(calls, n_prompt, n_img, normalise, branch=0):
    """Mean over calls and the branch's chunks of the full softmax's image -> prompt block, float64.
    Each chunk's prompt is its last n_prompt text keys (left padding before them); "text" rows are
    renormalised over that prompt's keys only."""
    parts = []
    for q, k, mask, chunks in calls:
        logits = rec.scaled_logits(q, k, mask)
        start = TEXT_LEN - n_prompt
        if normalise == "text":
            probs = logits[..., start:TEXT_LEN].softmax(-1)
        else:
            probs = logits.softmax(-1)[..., start:TEXT_LEN]
        probs = probs[:, :, TEXT_LEN:TEXT_LEN + n_img].mean(1)
        parts += rec.branch_parts(probs, chunks, branch)
    return sum(parts) / len(parts)


CASES = [  # variant, batch, latent h, w, reference
    ("flux2", 1, 6, 10, False), ("flux2", 2, 5, 9, True), ("klein", 2, 7, 4, False), ("klein", 1, 5, 8, True),
]


@pytest.mark.parametrize("normalise", ["text", "joint"])
@pytest.mark.parametrize("variant,batch,height,width,reference", CASES,
                         ids=[f"{c[0]}-b{c[1]}-{c[2]}x{c[3]}{'-ref' if c[4] else ''}" for c in CASES])
def test_maps_equal_brute_force_and_output_unchanged(variant, batch, height, width, reference, normalise):
    model = dit_host.model("flux", variant)
    options = reference_options(reference)
    # prompts of different lengths: each is left-padded by its own length, batched together
    positive = dit_host.conditioning(N_TOKENS, seed=1, **options)
    negative = dit_host.conditioning(N_TOKENS + 4, seed=2, **options)
    spy = rec.SpyOverride()
    out, maps = rec.recording(rec.with_override(model, spy), positive, negative, latent(batch, height, width),
                              dit_blocks="double all, single all", normalise=normalise)
    assert families.family_of(model).name == "Flux.2"
    n_ref = 4 * 6 if reference else 0
    assert {c[0].shape[2] for c in spy.calls} == {TEXT_LEN + height * width + n_ref}  # patch 1: a token per cell
    expected = brute_force(spy.calls, N_TOKENS, height * width, normalise)
    assert maps.probs.shape == (batch, height, width, N_TOKENS)  # the grid is the latent
    assert maps.latent_hw == (height, width) and maps.level == 0 and maps.pixel_scale == 16
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    if normalise == "text":
        assert torch.allclose(maps.probs.sum(-1), torch.ones(()), atol=1e-5)
    else:  # the model's own rows leave mass on the padding, image and reference keys
        assert float(maps.probs.sum(-1).max()) < 1
    assert torch.equal(out, rec.plain(rec.with_override(model, rec.SpyOverride()), positive, negative,
                                      latent(batch, height, width)))


@pytest.mark.parametrize("normalise", ["text", "joint"])
@pytest.mark.parametrize("kernel_name", ["comfy default (sub-quadratic)", "pytorch"])
def test_output_bit_identical_to_plain_sampling(kernel_name, normalise, monkeypatch):
    if kernel_name == "pytorch":
        rec.pytorch_attention(monkeypatch)
    model = dit_host.model("flux", "flux2")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    out, maps = rec.recording(model, positive, negative, latent(2, 5, 9), normalise=normalise)
    assert torch.equal(out, rec.plain(model, positive, negative, latent(2, 5, 9)))
    assert maps.probs.isfinite().all() and float(maps.probs.sum()) > 0


@pytest.mark.parametrize("variant,depths,default", [("flux2", (8, 48), [6, 7]), ("klein", (5, 20), [4])])
def test_default_blocks_at_the_real_block_count(variant, depths, default):
    """The released models' block counts ([dev] 8 + 48, [klein] 4B 5 + 20): the default records
    the late double blocks (docs/recording.md), exactly those blocks' calls."""
    model = dit_host.build("flux", seed=3, variant=variant, real_depth=True)
    diffusion_model = model.model.diffusion_model
    assert (len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)) == depths
    family = families.family_of(model)
    assert families.default_blocks(family, diffusion_model) == [("double_block", i) for i in default]
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    spy = rec.SpyOverride()
    _, maps = rec.recording(rec.with_override(model, spy), positive, negative, latent(1, 4, 6), cfg=1.0, steps=1)
    per_forward = sum(depths)
    assert len(spy.calls) == per_forward
    chosen = [spy.calls[i] for i in default]
    expected = brute_force(chosen, N_TOKENS, 24, "text")
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6)
    assert families.parse_blocks("single 0-2", family, diffusion_model) == [("single_block", i) for i in range(3)]
    with pytest.raises(ValueError, match=rf"outside Flux.2's double blocks 0-{depths[0] - 1}"):
        families.parse_blocks(f"double {depths[0]}", family, diffusion_model)


FILLER = "a photo of a small cat sitting on the green grass near an old wooden fence".split()
CAT, FENCE = FILLER.index("cat"), FILLER.index("fence")


def word_tokens():
    tokens = pack_module("attention.tokens")
    return tokens.PromptTokens(text=" ".join(FILLER), token_strings=list(FILLER),
                               words=[tokens.Word(w, (i,)) for i, w in enumerate(FILLER)])


GRID = (12, 20)  # a non-square latent: one token per latent cell


@pytest.fixture(scope="module")
def real_depth_models():
    return {seed: dit_host.build("flux", seed=seed, variant="flux2", real_depth=True) for seed in (0, 1, 2)}


def planted_mask(model, regions, beta, words, reference=False, word=CAT):
    """Attention Mask of `words[word]` after sampling a model planted on `regions` [B, h, w]."""
    tokens = word_tokens()
    planted = dit_plant.plant(model, regions, [word], beta=beta)
    positive = dit_host.conditioning(len(words), 1, tokens=tokens, **reference_options(reference))
    negative = dit_host.conditioning(3, 2, **reference_options(reference))
    _, maps = rec.recording(planted, positive, negative, latent(regions.shape[0], *GRID), cfg=1.0, steps=2)
    assert maps.probs.shape == (regions.shape[0], *GRID, len(words))
    blur, threshold = pack_module("masks.attention_mask").DEFAULT_BLUR, 0.5  # the node's defaults
    return nodes.AttentionMask().run(maps, words[word], blur, threshold, "union")[0]


def regions_of_batch():
    first = dit_plant.region_mask(GRID, slice(2, 8), slice(3, 11))
    second = dit_plant.region_mask(GRID, slice(5, 11), slice(10, 18))
    return torch.stack([first, second])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [4.0, 8.0])
def test_planted_regions_are_recovered_per_image(real_depth_models, seed, beta):
    """Batch 2 with a different region per image, filler words around the planted one, the real
    block count, the default blocks: Attention Mask (16x the latent) finds each image's region."""
    regions = regions_of_batch()
    mask = planted_mask(real_depth_models[seed], regions, beta, FILLER)
    assert mask.shape == (2, 16 * GRID[0], 16 * GRID[1])
    for b in range(2):
        expected = regions[b].repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert dit_plant.iou(mask[b] > 0.5, expected) >= 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_region_with_a_reference_image(real_depth_models, seed):
    """Flux.2's reference editing: the reference's tokens follow the image's; the map is the
    generated image's, and the planted word still comes back."""
    regions = regions_of_batch()
    mask = planted_mask(real_depth_models[seed], regions, 6.0, FILLER, reference=True, word=FENCE)
    for b in range(2):
        expected = regions[b].repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert dit_plant.iou(mask[b] > 0.5, expected) >= 0.9


def test_existing_override_still_runs_and_shapes_the_output():
    model = dit_host.model("flux", "flux2")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    changed, reference = rec.SpyOverride(v_scale=1.5), rec.SpyOverride(v_scale=1.5)
    out, _ = rec.recording(rec.with_override(model, changed), positive, negative, latent())
    assert len(changed.calls) == rec.STEPS * 4  # every attention call (2 double + 2 single blocks)
    assert torch.equal(out, rec.plain(rec.with_override(model, reference), positive, negative, latent()))
    assert not torch.equal(out, rec.plain(model, positive, negative, latent()))


def test_existing_block_patch_still_runs():
    """A dit block patch already on the model (Flux.2's block args carry a tuple `vec`)."""
    model = dit_host.model("flux", "flux2")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)

    def patched(patch):
        clone = model.clone()
        clone.set_model_patch_replace(patch, "dit", "double_block", 1)
        return clone

    ours, theirs = rec.BlockPatch(), rec.BlockPatch()
    out, maps = rec.recording(patched(ours), positive, negative, latent())  # the default block is 1
    assert ours.calls == rec.STEPS and float(maps.probs.sum()) > 0
    assert torch.equal(out, rec.plain(patched(theirs), positive, negative, latent()))


def test_flux1_and_flux2_share_the_class_and_get_their_own_adapter():
    flux1, flux2 = dit_host.model("flux"), dit_host.model("flux", "flux2")
    assert type(flux1.model.diffusion_model) is type(flux2.model.diffusion_model)
    assert families.family_of(flux1).name == "Flux" and families.family_of(flux1).spatial_patch == 2
    assert families.family_of(flux2).name == "Flux.2" and families.family_of(flux2).spatial_patch == 1
    assert families.FAMILIES["comfy.ldm.flux.model.Flux"] is families.family_of(flux1)


def test_another_patch_size_in_flux_class_is_refused_naming_it(monkeypatch):
    model = dit_host.model("flux", "flux2").clone()
    monkeypatch.setattr(model.model.diffusion_model, "patch_size", 4)
    assert families.family_of(model) is None
    with pytest.raises(TypeError, match=r"Flux's class with patch size 4 \(the pack reads patch 1 / 2"):
        families.require_family(model)

