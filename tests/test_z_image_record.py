"""Recording word maps on Z-Image (Turbo) on the real ComfyUI host: tiny random-weight models of
ComfyUI's Lumina2 NextDiT, configured as ComfyUI configures a Z-Image checkpoint (dit_host's
"zimage" skeleton), sampled with comfy.sample. Z-Image's main layers have no patches_replace["dit"]
hook (the model writes transformer_options["block_index"] instead) and its context / noise refiner
layers also go through the attention override: maps equal a float64 brute force over the chosen
main layers only, the sampled latent is bit-identical with and without recording, and a planted
word region is found with IoU >= 0.9."""
import functools

import pytest
import torch

from ae_testlib import host

host.module_requires("z_image")

import test_dit_record as rec  # noqa: E402
from ae_testlib import dit_host, dit_plant  # noqa: E402
from ae_testlib.pack import pack_module  # noqa: E402

families = pack_module("attention.families")
nodes = pack_module("nodes.record")
tokens_mod = pack_module("attention.tokens")
mask_module = pack_module("masks.attention_mask")

plain, recording = rec.plain, rec.recording  # KSampler without / with recording, 2 steps at cfg 2
N_TOKENS = 7
PAD = 32  # Z-Image pads its caption (and image) tokens to a multiple of 32 (pad_tokens_multiple)


@pytest.fixture(autouse=True)
def _host(comfy_host):
    dit_host.require_dit_host()


@functools.lru_cache(maxsize=None)
def zimage(seed=0, real_depth=False):
    """Tiny Z-Image (256 wide, 2 refiner layers of each kind); real_depth: its 30 main layers."""
    return dit_host.build("zimage", seed=seed, real_depth=real_depth)


class BlockSpy(rec.SpyOverride):
    """SpyOverride that also keeps, per call, the main layer running (None in the refiners)."""

    def __init__(self, v_scale=1.0):
        super().__init__(v_scale)
        self.blocks = []

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        self.blocks.append(options.get("block_index") if options.get("block_type") == "double" else None)
        return super().__call__(func, *args, **kwargs)


def padded(n):
    return n + (-n) % PAD


def brute_force(spy, n_real, grid, chosen, branch=0, normalise="text"):
    """Mean over the chosen main layers' calls and branch chunks of the image rows' probabilities
    on the prompt's n_real tokens, float64, from the full logits: text rows start after the padded
    caption; "text" renormalises over the prompt's own tokens, "joint" keeps every key."""
    n_txt, n_img = padded(n_real), grid[0] * grid[1]
    parts = []
    for (q, k, mask, chunks), block in zip(spy.calls, spy.blocks):
        if block not in chosen or q.shape[2] < n_txt + n_img:
            continue
        logits = rec.scaled_logits(q, k, mask)
        rows = slice(n_txt, n_txt + n_img)
        if normalise == "text":
            probs = logits[:, :, rows, :n_real].softmax(-1).mean(1)
        else:
            probs = logits.softmax(-1)[:, :, rows, :n_real].mean(1)
        parts += rec.branch_parts(probs, chunks, branch)
    return sum(parts) / len(parts)


def grid_of(height, width):
    return (-(-height // 2), -(-width // 2))


CASES = [(1, 6, 10), (2, 5, 9)]  # batch, latent h, w (5 x 9: padded to the patch, non-square)


@pytest.mark.parametrize("normalise", ["text", "joint"])
@pytest.mark.parametrize("batch,height,width", CASES, ids=[f"b{c[0]}-{c[1]}x{c[2]}" for c in CASES])
def test_maps_equal_brute_force_and_output_unchanged(batch, height, width, normalise):
    model = zimage()
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("zimage", batch, height, width)
    spy = BlockSpy()
    out, maps = recording(rec.with_override(model, spy), positive, negative, latent, dit_blocks="all",
                          normalise=normalise)
    grid = grid_of(height, width)
    expected = brute_force(spy, N_TOKENS, grid, {0, 1}, normalise=normalise)
    assert maps.family == "Z-Image" and maps.probs.shape == (batch, *grid, N_TOKENS)
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    if normalise == "text":
        assert torch.allclose(maps.probs.sum(-1), torch.ones(()), atol=1e-5)
    else:  # caption padding and image keys keep part of the joint row
        assert float(maps.probs.sum(-1).max()) < 1
    assert torch.equal(out, plain(rec.with_override(model, BlockSpy()), positive, negative, latent))
    # per forward: 2 context-refiner calls (caption only), 2 noise-refiner calls (image only), 2 main
    lengths = [q.shape[2] for q, _, _, _ in spy.calls]
    n_img_padded = padded(grid[0] * grid[1])
    per_forward = [PAD, PAD, n_img_padded, n_img_padded, PAD + n_img_padded, PAD + n_img_padded]
    assert lengths == per_forward * (len(lengths) // 6) and len(lengths) == 6 * 2  # 2 steps, cond + uncond batched
    assert spy.blocks[:6] == [None, None, None, None, 0, 1]


@pytest.mark.parametrize("normalise", ["text", "joint"])
def test_pytorch_attention_output_bit_identical(normalise, monkeypatch):
    """With --use-pytorch-cross-attention (NextDiT binds its kernel at import) the joint rows run
    SDPA's CPU flash kernel in the recorder itself, once per recorded layer and step: the latent
    stays bit-identical to plain sampling, and the maps (fused, and beside an override already
    there) equal the brute force."""
    from comfy.ldm.lumina import model as lumina
    from comfy.ldm.modules import attention

    recorder_mod = pack_module("attention.dit_recorder")
    fused_calls = []

    def counting_fused(call):
        fused_calls.append(1)
        return rec.kernel.fused_attention(call)

    monkeypatch.setattr(lumina, "optimized_attention_masked", attention.attention_pytorch)
    monkeypatch.setattr(recorder_mod, "fused_attention", counting_fused)
    model = zimage()
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("zimage", 2, 5, 9)
    out, maps = recording(model, positive, negative, latent, normalise=normalise)
    assert torch.equal(out, plain(model, positive, negative, latent))
    assert len(fused_calls) == (rec.STEPS if normalise == "joint" else 0)  # default block: layer 1 of 2
    spy = BlockSpy()  # an override already there: the recorder computes beside it, from the same q, k
    _, beside = recording(rec.with_override(model, spy), positive, negative, latent, normalise=normalise)
    expected = brute_force(spy, N_TOKENS, grid_of(5, 9), {1}, normalise=normalise)
    for probs in (maps.probs, beside.probs):
        assert torch.allclose(probs.double(), expected.reshape(probs.shape), atol=2e-6, rtol=0)


def test_refiner_layers_are_never_recorded():
    """The refiners run before the first main layer. Even with block metadata already in
    transformer_options when they run (another pack's leftovers: block 0, "double"), their calls,
    shorter than caption + image, stay out of the maps: exactly main layer 0's calls are in them."""
    model = zimage()
    stale = model.clone()
    options = stale.model_options.setdefault("transformer_options", {})
    options.update(block_index=0, block_type="double")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("zimage", 1, 6, 10)
    spy = BlockSpy()
    out, maps = recording(rec.with_override(stale, spy), positive, negative, latent, dit_blocks="0")
    assert spy.blocks[:4] == [0, 0, 0, 0]  # the refiners did see "block 0"
    grid = grid_of(6, 10)
    main_only = brute_force(spy, N_TOKENS, grid, {0})
    assert torch.allclose(maps.probs.double(), main_only.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert torch.equal(out, plain(model, positive, negative, latent))


def test_default_blocks_at_real_depth():
    """Z-Image's 30 main layers: the default is layers 24-28 (79-95 % of the depth, as for the other
    single-stream families), and the maps hold exactly those layers' calls."""
    model = zimage(0, real_depth=True)
    diffusion_model = model.model.diffusion_model
    assert len(diffusion_model.layers) == 30 and len(diffusion_model.noise_refiner) == 2
    family = families.family_of(model)
    assert families.default_blocks(family, diffusion_model) == [("double_block", i) for i in range(24, 29)]
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("zimage", 2, 5, 9)
    spy = BlockSpy()
    out, maps = recording(rec.with_override(model, spy), positive, negative, latent)
    expected = brute_force(spy, N_TOKENS, grid_of(5, 9), set(range(24, 29)))
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert torch.equal(out, plain(model, positive, negative, latent))


def test_existing_override_still_runs_and_shapes_the_output():
    model = zimage()
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("zimage")
    changed, reference = BlockSpy(v_scale=1.5), BlockSpy(v_scale=1.5)
    out, maps = recording(rec.with_override(model, changed), positive, negative, latent, dit_blocks="all")
    assert len(changed.calls) == rec.STEPS * 6  # refiners and main layers all went through it
    assert torch.equal(out, plain(rec.with_override(model, reference), positive, negative, latent))
    assert not torch.equal(out, plain(model, positive, negative, latent))
    assert float(maps.probs.sum()) > 0


# ------------------------------------------------------------- planted regions

GRID = (12, 16)  # token grid of a 24 x 32 latent (non-square)
WORDS = "a photo of a small cat sitting on the green grass in soft light".split()  # filler words
CAT = WORDS.index("cat")


def annotated():
    return tokens_mod.PromptTokens(text=" ".join(WORDS), token_strings=list(WORDS),
                                   words=[tokens_mod.Word(w, (i,)) for i, w in enumerate(WORDS)])


def regions():
    """A different block per image of a batch of 2, 2+ tokens from the border."""
    return torch.stack([dit_plant.region_mask(GRID, slice(3, 9), slice(2, 10)),
                        dit_plant.region_mask(GRID, slice(5, 10), slice(8, 14))])


def planted_ious(seed, beta):
    model = zimage(seed, real_depth=True)
    region = regions()
    planted = dit_plant.plant(model, region, [CAT], beta=beta)
    positive = dit_host.conditioning(len(WORDS), seed=seed + 10, tokens=annotated())
    negative = dit_host.conditioning(3, seed=seed + 20)
    _, maps = recording(planted, positive, negative, dit_host.latent("zimage", 2, 2 * GRID[0], 2 * GRID[1]),
                        cfg=1.0, steps=4)
    mask = nodes.AttentionMask().run(maps, "cat", mask_module.DEFAULT_BLUR, mask_module.DEFAULT_THRESHOLD,
                                     "union")[0]
    expected = region.repeat_interleave(16, -2).repeat_interleave(16, -1)
    return [dit_plant.iou(mask[i] > 0.5, expected[i]) for i in range(2)]


@pytest.mark.parametrize("beta", [4.0, 8.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_region_is_recovered(seed, beta):
    """Batch 2 with a different region per image, 14 words, the 30-layer model's default blocks,
    Attention Mask at its defaults: IoU >= 0.9 on each image."""
    ious = planted_ious(seed, beta)
    print(f"Z-Image seed {seed} beta {beta}: IoU {ious[0]:.3f} / {ious[1]:.3f}")
    assert min(ious) >= 0.9, ious


# ------------------------------------------------------------- what is refused, clearly

def test_lumina2_in_the_same_class_is_refused_clearly():
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_heads=2, n_kv_heads=2, n_layers=1,
                  axes_dims=[8, 12, 12], cap_feat_dim=dit_host.CONTEXT_DIM, qk_norm=True)
    lumina = comfy.model_patcher.ModelPatcher(sm.Lumina2(config).get_model({}), torch.device("cpu"),
                                              torch.device("cpu"))
    assert families.family_of(lumina) is None and families.family_of(zimage()).name == "Z-Image"
    with pytest.raises(TypeError, match=r"Lumina Image 2.0.*Z-Image / Z-Image Turbo only.*Z-Image \(Turbo\)"):
        pack_module("samplers.record").make_recorder(lumina, "cond", N_TOKENS)


def test_foi_refuses_z_image_clearly():
    foi_dit = pack_module("attention.foi_dit")
    state = type("State", (), {"mask_blocks_spec": ""})()
    with pytest.raises(TypeError, match=r"FoI is not built for Z-Image yet.*FoI runs on Flux"):
        foi_dit.install_foi_dit(zimage().clone(), state)
    # the FoI nodes' first check (samplers.foi_dit.edit_model) gives the family's reason too
    with pytest.raises(TypeError, match=r"FoI is not built for Z-Image yet.*supports Flux Kontext, Flux.2"):
        pack_module("samplers.foi_dit").edit_model(zimage())


def test_attention_text_encode_words_on_z_image():
    """The whole chain on real conditioning: Attention Text Encode with ComfyUI's Z-Image tokenizer
    and Qwen3 encoder classes (tiny encoder; the words sit after the template's 3 opening tokens),
    a planted region on "cat"'s own positions, Attention Mask by the word: IoU >= 0.9."""
    from ae_testlib import dit_text

    dit_text.require_dit_clip("z_image")
    clip = dit_text.build_dit_clip("z_image")
    encode = pack_module("nodes.encode")
    text = "a photo of a cat on grass"
    with torch.inference_mode():
        positive = encode.AttentionTextEncode().run(clip, text)[0]
        negative = encode.AttentionTextEncode().run(clip, "")[0]
    tokens = positive[0][1][tokens_mod.ANNOTATION_KEY]
    assert tokens.positions("cat") == [7] and tokens.token_strings[:3] == ["<|im_start|>", "user", "Ċ"]
    model = dit_host.build("zimage", 0, context_dim=positive[0][0].shape[-1])
    region = dit_plant.region_mask(GRID, slice(3, 9), slice(2, 10))
    planted = dit_plant.plant(model, region, tokens.positions("cat"), beta=8.0)
    _, maps = recording(planted, positive, negative, dit_host.latent("zimage", 1, 2 * GRID[0], 2 * GRID[1]),
                        cfg=1.0, steps=4)
    mask = nodes.AttentionMask().run(maps, "cat", mask_module.DEFAULT_BLUR, mask_module.DEFAULT_THRESHOLD,
                                     "union")[0]
    expected = region.repeat_interleave(16, -2).repeat_interleave(16, -1)
    assert maps.probs.shape[-1] == tokens.n_tokens
    assert dit_plant.iou(mask[0] > 0.5, expected) >= 0.9
