"""Recording on HunyuanImage 2.1 on the real ComfyUI host: tiny random-weight models from ComfyUI's
own HunyuanVideo class (patch [1, 1], 64-channel latent, byT5 glyph mapper), sampled with
comfy.sample. Maps equal a float64 brute force of the joint attention in the host's own token
order ([image | text] on ComfyUI 0.3.64, [text | image] on 0.19.3), the byT5 glyph tokens are text keys
after the Qwen2.5-VL ones, the token refiner is never recorded, the sampled latent is bit-identical
with and without recording, planted word regions are found, and the refiner / HunyuanVideo (same
class, 3-D patch) are refused clearly."""
import inspect

import pytest
import torch

import test_dit_record as rec
from ae_testlib import dit_host, dit_plant, host
from ae_testlib.pack import pack_module

families = pack_module("attention.families")
tokens_mod = pack_module("attention.tokens")
nodes = pack_module("nodes.record")

pytestmark = host.requires("hunyuan_image")
plain, recording, SpyOverride, with_override = rec.plain, rec.recording, rec.SpyOverride, rec.with_override
FAMILY = "hunyuan_image"
N_CTX = 7  # Qwen2.5-VL tokens of the tiny conditionings
BYT5 = 1472  # byT5-small's width, which the model's byt5_in takes


@pytest.fixture(autouse=True)
def _dit_host(comfy_host):
    dit_host.require_dit_host()


def image_first_in_host_code():
    """The host's token order read from its model code (not from the adapter): single blocks run
    on cat((img, txt)) on ComfyUI 0.3.64, on cat((txt, img)) on 0.19.3."""
    from comfy.ldm.hunyuan_video import model

    source = inspect.getsource(model.HunyuanVideo.forward_orig)
    assert ("torch.cat((img, txt), 1)" in source) != ("torch.cat((txt, img), 1)" in source)
    return "torch.cat((img, txt), 1)" in source


def brute_force(calls, n_txt, n_img, branch=0, normalise="joint", image_first=None):
    """Mean over calls and branch chunks of the full softmax's image->text block, float64, in the
    host's token order."""
    image_first = image_first_in_host_code() if image_first is None else image_first
    rows, cols = (slice(0, n_img), slice(n_img, n_img + n_txt)) if image_first else \
        (slice(n_txt, n_txt + n_img), slice(0, n_txt))
    parts = []
    for q, k, mask, chunks in calls:
        if q.shape[2] < n_txt + n_img:
            continue  # the token refiner's text-only self-attention
        logits = rec.scaled_logits(q, k, mask)
        if normalise == "text":
            logits = logits[..., cols]
            probs = logits.softmax(-1)[:, :, rows].mean(1)
        else:
            probs = logits.softmax(-1)[:, :, rows, cols].mean(1)
        parts += rec.branch_parts(probs, chunks, branch)
    return sum(parts) / len(parts)


def conds(byt5=0, seed=1, **options):
    """Positive (with `byt5` glyph tokens when > 0) and negative tiny conditionings."""
    if byt5:
        options["conditioning_byt5small"] = torch.randn(1, byt5, BYT5, generator=torch.Generator().manual_seed(seed))
    return dit_host.conditioning(N_CTX, seed, **options), dit_host.conditioning(N_CTX, seed + 1)


CASES = [(1, 6, 10, 0), (2, 5, 9, 0), (1, 6, 10, 4), (2, 7, 4, 3)]  # batch, latent h, w, byT5 tokens


@pytest.mark.parametrize("normalise", ["joint", "text"])
@pytest.mark.parametrize("batch,height,width,byt5", CASES, ids=[f"b{c[0]}-{c[1]}x{c[2]}-byt5_{c[3]}" for c in CASES])
def test_maps_equal_brute_force_and_output_unchanged(batch, height, width, byt5, normalise):
    model = dit_host.model(FAMILY)
    positive, negative = conds(byt5)
    latent = dit_host.latent(FAMILY, batch, height, width)
    spy = SpyOverride()
    out, maps = recording(with_override(model, spy), positive, negative, latent,
                          dit_blocks="double all, single all", normalise=normalise)
    n_txt = N_CTX + byt5
    expected = brute_force(spy.calls, n_txt, height * width, normalise=normalise)
    assert maps.probs.shape == (batch, height, width, n_txt)  # patch 1: the grid is the latent
    assert maps.latent_hw == (height, width) and maps.level == 0 and maps.pixel_scale == 32
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    # the other token order gives other maps: the comparison can tell them apart
    other = brute_force(spy.calls, n_txt, height * width, normalise=normalise, image_first=not image_first_in_host_code())
    assert not torch.allclose(maps.probs.double(), other.reshape(maps.probs.shape), atol=1e-3)
    assert maps.count == (2 + 2) * rec.STEPS  # 4 blocks x steps: the token refiner's calls are not in it
    assert torch.equal(out, plain(with_override(model, SpyOverride()), positive, negative, latent))


def test_padding_mask_of_the_text_is_read():
    """A Qwen2.5-VL attention mask with padding (ComfyUI passes it when some are 0): masked keys
    get no probability, as the model's own softmax gives them none."""
    model = dit_host.model(FAMILY)
    mask = torch.ones(1, N_CTX, dtype=torch.long)
    mask[:, -2:] = 0
    positive, negative = conds(attention_mask=mask)
    latent = dit_host.latent(FAMILY, 1, 6, 10)
    spy = SpyOverride()
    out, maps = recording(with_override(model, spy), positive, negative, latent, dit_blocks="double all, single all",
                          normalise="text")
    expected = brute_force(spy.calls, N_CTX, 60, normalise="text")
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert float(maps.probs[..., -2:].max()) < 1e-6 < float(maps.probs[..., :-2].min())
    assert torch.equal(out, plain(with_override(model, SpyOverride()), positive, negative, latent))


@pytest.mark.parametrize("normalise", ["text", "joint"])
def test_pytorch_attention_output_bit_identical(normalise, monkeypatch):
    rec.pytorch_attention(monkeypatch)
    model = dit_host.model(FAMILY)
    positive, negative = conds(3)
    latent = dit_host.latent(FAMILY, 2, 5, 9)
    out, maps = recording(model, positive, negative, latent, normalise=normalise)
    assert torch.equal(out, plain(model, positive, negative, latent))
    assert maps.probs.isfinite().all() and float(maps.probs.sum()) > 0


def test_default_blocks_on_the_real_block_count():
    """20 double + 40 single blocks (tiny width): the default records double blocks 16-19 (the
    late double blocks, as on Flux), and the maps are those blocks' brute force."""
    model = dit_host.build(FAMILY, real_depth=True)
    diffusion_model = model.model.diffusion_model
    assert (len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)) == (20, 40)
    family = families.family_of(model)
    assert families.default_blocks(family, diffusion_model) == [("double_block", i) for i in range(16, 20)]
    positive, negative = conds(2)
    latent = dit_host.latent(FAMILY, 1, 4, 6)
    spy = SpyOverride()
    _, maps = recording(with_override(model, spy), positive, negative, latent, cfg=1.0)
    joint = [call for call in spy.calls if call[0].shape[2] == N_CTX + 2 + 24]
    assert len(spy.calls) == len(joint) + 2 * rec.STEPS  # + the token refiner's 2 blocks, text only
    chosen = [call for i, call in enumerate(joint) if 16 <= i % 60 <= 19]
    expected = brute_force(chosen, N_CTX + 2, 24, normalise="text")
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert maps.count == 4 * rec.STEPS


def test_existing_override_and_block_patch_still_run():
    model = dit_host.model(FAMILY)
    positive, negative = conds(2)
    latent = dit_host.latent(FAMILY, 1, 6, 10)

    def patched(override, block_patch):
        clone = with_override(model, override)
        clone.set_model_patch_replace(block_patch, "dit", "double_block", 1)
        return clone

    changed, ours = SpyOverride(v_scale=1.5), rec.BlockPatch()
    out, maps = recording(patched(changed, ours), positive, negative, latent)  # default: double block 1
    # cond and uncond run apart (only the positive has byT5 tokens): 2 forwards a step
    assert ours.calls == 2 * rec.STEPS and float(maps.probs.sum()) > 0
    # every attention call (token refiner 2 + 2 double + 2 single, per forward) went through it
    assert len(changed.calls) == rec.STEPS * 2 * 6
    assert torch.equal(out, plain(patched(SpyOverride(v_scale=1.5), rec.BlockPatch()), positive, negative, latent))
    assert not torch.equal(out, plain(model, positive, negative, latent))


def test_refiner_and_hunyuan_video_are_refused_clearly():
    """HunyuanImage 2.1's refiner (and HunyuanVideo) run in the same class with a 3-D patch."""
    model = dit_host.build(FAMILY, variant="refiner")
    assert type(model.model).__name__ == "HunyuanImage21Refiner"
    assert families.family_of(model) is None
    with pytest.raises(TypeError, match="HunyuanImage 2.1 refiner.*patch size \\[1, 1, 1\\].*HunyuanImage 2.1 "):
        families.dit_family(model)
    with pytest.raises(TypeError, match="refiner"):
        recording(model, *conds(), dit_host.latent(FAMILY, 1, 4, 6))


# ---------------------------------------------------------------- planted regions

PLANT_WORDS = "a photo of a cat on grass".split()  # one Qwen token per word, plus filler context


def plant_tokens(byt5_words=()):
    strings = PLANT_WORDS + [""] * (N_CTX - len(PLANT_WORDS)) + list(byt5_words)
    words = [tokens_mod.Word(w, (i,)) for i, w in enumerate(PLANT_WORDS)]
    words += [tokens_mod.Word(w, (N_CTX + i,)) for i, w in enumerate(byt5_words)]
    return tokens_mod.PromptTokens(text=" ".join(PLANT_WORDS + list(byt5_words)), token_strings=strings, words=words)


def planted_iou(seed, beta, word="cat", byt5_words=(), mode="bias"):
    """Batch 2 with a different region per image, on a non-square 12 x 16 latent, the real block
    count, default blocks; IoU of the Attention Mask node's mask (32x the latent) per image."""
    model = dit_host.build(FAMILY, seed=seed, real_depth=True)
    grid = (12, 16)
    regions = torch.zeros(2, *grid, dtype=torch.bool)
    regions[0, 2:8, 3:11] = True
    regions[1, 5:11, 8:15] = True
    tokens = plant_tokens(byt5_words)
    column = tokens.positions(word)
    planted = dit_plant.plant(model, regions, column, beta=beta, mode=mode)
    options = {"conditioning_byt5small": torch.randn(1, len(byt5_words), BYT5)} if byt5_words else {}
    positive = dit_host.conditioning(N_CTX, seed, tokens=tokens, **options)
    _, maps = recording(planted, positive, dit_host.conditioning(N_CTX, seed + 1), dit_host.latent(FAMILY, 2, *grid),
                        cfg=1.0, steps=3)
    mask = nodes.AttentionMask().run(maps, word, nodes.DEFAULT_BLUR, 0.5, "union")[0]  # the node default
    assert mask.shape == (2, 32 * grid[0], 32 * grid[1])
    expected = regions.repeat_interleave(32, 1).repeat_interleave(32, 2)
    return [dit_plant.iou(mask[i] > 0.5, expected[i]) for i in range(2)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [4.0, 8.0])
def test_planted_word_region_found(seed, beta):
    ious = planted_iou(seed, beta)
    print(f"HunyuanImage planted seed {seed} beta {beta}: IoU {ious}")
    assert min(ious) >= 0.9, ious


def test_planted_glyph_word_found_in_the_byt5_tokens():
    """A word of the quoted glyph text sits in the byT5 tokens, after the Qwen2.5-VL tokens."""
    ious = planted_iou(0, 8.0, word="OPEN", byt5_words=("Text", "OPEN", "."))
    assert min(ious) >= 0.9, ious


def test_foi_refuses_hunyuan_image_clearly():
    """FoI edits with Flux Kontext / Flux.2 / Qwen-Image-Edit: HunyuanImage 2.1 is no editing model."""
    foi = pack_module("samplers.foi_dit")
    with pytest.raises(TypeError, match="not an instruction-editing model. FoI for DiT models supports Flux Kontext, Flux.2 and "
                       "Qwen-Image-Edit.*HunyuanImage"):
        foi.edit_model(dit_host.model(FAMILY))
