"""Recording word masks per frame on Wan video models, on the real ComfyUI host: tiny random-weight
Wan 2.1 (T2V, I2V, VACE) and Wan 2.2 5B models from ComfyUI's classes (ae_testlib.wan_host),
sampled with comfy.sample. Maps equal a brute force from the text cross-attention modules
themselves, the sampled latent is bit-identical with and without recording, a planted word region
that moves from frame to frame is found in every decoded frame, and mask batches have the frame
count ComfyUI's own Wan VAE decodes."""
import pytest
import torch

import test_dit_record as rec
from ae_testlib import dit_plant, dit_text, wan_host
from ae_testlib.pack import pack_module

families = pack_module("attention.families")
nodes = pack_module("nodes.record")
encode = pack_module("nodes.encode")
video = pack_module("masks.video")
tokens_mod = pack_module("attention.tokens")

plain, recording = rec.plain, rec.recording  # KSampler without / with recording, 2 steps at cfg 2
N_REAL = 7  # the prompt's real umT5 tokens (words + </s>); the other 505 rows are zeroed padding


@pytest.fixture(autouse=True)
def _wan(comfy_host):
    wan_host.require_wan_host()


def conds(variant, n_real=N_REAL, **options):
    clip_image = variant == "wan21_i2v"
    return (wan_host.conditioning(n_real, seed=1, clip_image=clip_image, **options),
            wan_host.conditioning(3, seed=2, clip_image=clip_image))


class CrossAttentionProbe:
    """Forward hooks on the main blocks' text cross-attention modules: recomputes q, k from the
    module's own layers and its inputs, and averages the cond rows' softmax over the prompt's
    real keys (float64). Independent of the override the recorder uses; VACE blocks' and I2V's
    CLIP-image keys are not the main blocks' text keys, so they are not in it."""

    def __init__(self, model, n_real, normalise, video_rows=None):
        self.n_real, self.normalise, self.video_rows = n_real, normalise, video_rows
        self.total, self.count, self.vace_calls = None, 0, 0
        diffusion_model = model.model.diffusion_model
        self.handles = [block.cross_attn.register_forward_hook(self.hook, with_kwargs=True)
                        for block in diffusion_model.blocks]
        for block in getattr(diffusion_model, "vace_blocks", []):
            self.handles.append(block.cross_attn.register_forward_hook(self.count_vace))

    def count_vace(self, module, args, output):
        self.vace_calls += 1

    def hook(self, module, args, kwargs, output):
        x, context = args[0], args[1]
        self.query_rows = x.shape[1]  # video tokens, plus reference / Phantom tokens where present
        x = x if self.video_rows is None else x[:, self.video_rows]
        text = context[:, (kwargs.get("context_img_len") or 0):]
        heads = module.num_heads
        q = module.norm_q(module.q(x)).double()
        k = module.norm_k(module.k(text)).double()
        q = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
        logits = rec.scaled_logits(q, k)
        if self.normalise == "text":
            probs = torch.zeros_like(logits)
            probs[..., :self.n_real] = logits[..., :self.n_real].softmax(-1)
        else:
            probs = logits.softmax(-1)
            probs[..., self.n_real:] = 0
        probs = probs.mean(1)
        for part in rec.branch_parts(probs, kwargs["transformer_options"].get("cond_or_uncond", [0]), 0):
            self.total = part if self.total is None else self.total + part
            self.count += 1

    def mean(self):
        for handle in self.handles:
            handle.remove()
        return self.total / self.count


CASES = [  # variant, batch, latent frames, h, w
    ("wan21", 1, 3, 6, 10), ("wan21", 2, 2, 5, 8), ("wan21_i2v", 1, 2, 6, 10), ("wan21_vace", 1, 2, 6, 10),
    ("wan22_5b", 1, 3, 6, 10), ("wan22_5b", 2, 2, 4, 6),
]


@pytest.mark.parametrize("normalise", ["text", "joint"])
@pytest.mark.parametrize("variant,batch,frames,height,width", CASES,
                         ids=[f"{c[0]}-b{c[1]}-f{c[2]}-{c[3]}x{c[4]}" for c in CASES])
def test_maps_equal_brute_force_and_output_unchanged(variant, batch, frames, height, width, normalise):
    """Every block, every step: the maps are the mean over the main blocks' text cross-attention
    only (I2V's CLIP-image call and VACE's blocks left out) and the latent is KSampler's, bit for bit."""
    model = wan_host.model(variant)
    positive, negative = conds(variant)
    latent = wan_host.latent(variant, batch, frames, height, width)
    probe = CrossAttentionProbe(model, N_REAL, normalise)
    out, maps = recording(model, positive, negative, latent, dit_blocks="all", normalise=normalise)
    expected = probe.mean()
    if variant == "wan21_vace":
        assert probe.vace_calls > 0  # VACE blocks ran, with 512-key text calls of the same shape
    grid = (frames, -(-height // 2), -(-width // 2))
    assert maps.probs.shape == (batch, *grid, wan_host.TEXT_LEN) and maps.frames == frames
    assert maps.pixel_scale == (16 if variant == "wan22_5b" else 8)
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert float(maps.probs[..., N_REAL:].abs().max()) == 0  # the zeroed padding is not the prompt
    if normalise == "text":
        assert torch.allclose(maps.probs.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.equal(out, plain(model, positive, negative, latent))


@pytest.mark.parametrize("extra", ["reference", "phantom"])
def test_reference_and_phantom_tokens_are_not_the_video(extra):
    """Fun-Control's reference image (prepended H' x W' tokens) and Phantom's subject frames
    (time_dim_concat: appended frames) are keys of the self-attention, not rows of the maps."""
    variant = "wan21_ref" if extra == "reference" else "wan21"
    model = wan_host.model(variant)
    frames, height, width = 2, 6, 10
    n_img, n_frame = frames * 3 * 5, 3 * 5
    generator = torch.Generator().manual_seed(5)
    if extra == "reference":
        options = {"reference_latents": [torch.randn(1, 16, 1, height, width, generator=generator)]}
        rows = slice(n_frame, n_frame + n_img)
    else:
        options = {"time_dim_concat": torch.randn(1, 16, 1, height, width, generator=generator)}
        rows = slice(0, n_img)
    positive = wan_host.conditioning(N_REAL, seed=1, **options)
    negative = wan_host.conditioning(3, seed=2, **options)
    latent = wan_host.latent(variant, 1, frames, height, width)
    probe = CrossAttentionProbe(model, N_REAL, "text", video_rows=rows)
    out, maps = recording(model, positive, negative, latent, dit_blocks="all")
    expected = probe.mean()
    assert probe.query_rows == n_img + n_frame  # the extra tokens were there
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert torch.equal(out, plain(model, positive, negative, latent))


def test_pytorch_attention_fused_path_bit_identical(monkeypatch):
    """With --use-pytorch-cross-attention the joint rows come from the fused kernel's lse: the
    latent still equals plain sampling's."""
    from comfy.ldm.modules import attention
    from comfy.ldm.wan import model as wan_model

    monkeypatch.setattr(wan_model, "optimized_attention", attention.attention_pytorch)
    model = wan_host.model("wan21")
    positive, negative = conds("wan21")
    latent = wan_host.latent("wan21", 1, 2, 6, 10)
    for normalise in ("joint", "text"):
        out, maps = recording(model, positive, negative, latent, normalise=normalise)
        assert torch.equal(out, plain(model, positive, negative, latent))


def default_blocks(depth):
    class Model:  # only the block count matters
        blocks = [None] * depth

    return families.parse_blocks("", pack_module("attention.families.wan").WanFamily("Wan", "blocks"), Model())


def test_default_blocks_are_the_late_blocks():
    assert default_blocks(30) == [("double_block", i) for i in range(24, 29)]  # 2.1 1.3B, 2.2 5B
    assert default_blocks(40) == [("double_block", i) for i in range(32, 39)]  # 2.1 14B, 2.2 14B experts


# ------------------------------------------------------------- planted moving regions, per frame

FRAMES, GRID = 3, (16, 20)  # latent frames (9 decoded), token grid of a 32 x 40 latent (non-square)
WORD = 3  # the planted word's token column


def moving_region(batch_row):
    """A 6 x 8 token block that moves 2 token columns a frame (right in video 0; left and down a
    row a frame in video 1): every latent frame's region differs. At least 2 tokens from the
    border, where the mask's blur (reflect padding) would widen any region alike."""
    region = torch.zeros(FRAMES, *GRID, dtype=torch.bool)
    for frame in range(FRAMES):
        if batch_row == 0:
            region[frame, 3:9, 2 + 2 * frame:10 + 2 * frame] = True
        else:
            region[frame, 4 + frame:10 + frame, 10 - 2 * frame:18 - 2 * frame] = True
    return region


def expected_masks(region, scale):
    """The planted token regions at pixel size, one per decoded frame: token cells are 2 x 2
    latent cells of `scale` pixels; decoded frame p comes from latent frame (p + 3) // 4."""
    pixels = region.repeat_interleave(2 * scale, -2).repeat_interleave(2 * scale, -1)
    return pixels[:, video.latent_frame_of(video.pixel_frames(region.shape[1]))]


def annotated(words_at=WORD):
    """umT5 PromptTokens (as Attention Text Encode gives them on Wan) with 'cat' at the planted
    column (the recorder needs words for the nodes)."""
    strings = [f"w{i}" for i in range(N_REAL - 1)] + ["<end>"] + ["<pad>"] * (wan_host.TEXT_LEN - N_REAL)
    words = [tokens_mod.Word("cat" if i == words_at else f"w{i}", (i,)) for i in range(N_REAL - 1)]
    return pack_module("attention.text_encoders.mapping").EncoderPromptTokens(
        text=" ".join(w.text for w in words), token_strings=strings, words=words, end_positions=(N_REAL - 1,),
        encoder="wan", parts=(("umT5-XXL", 0, len(strings)),))


PLANT_SEEDS = (0, 1, 2)


@pytest.mark.parametrize("seed", PLANT_SEEDS)
@pytest.mark.parametrize("variant", ["wan21", "wan22_5b"])
def test_planted_moving_region_found_in_every_frame(variant, seed):
    """Batch 2 with a different moving region per video, non-square frames; Attention Mask with its
    defaults gives one mask per decoded frame, each with IoU >= 0.9 against the planted region."""
    model = wan_host.model(variant, seed)
    regions = torch.stack([moving_region(0), moving_region(1)])
    planted = wan_host.plant(model, regions, [WORD], beta=8.0)
    positive = wan_host.conditioning(N_REAL, seed=seed + 10, tokens=annotated())
    negative = wan_host.conditioning(3, seed=seed + 20)
    latent = wan_host.latent(variant, 2, FRAMES, 2 * GRID[0], 2 * GRID[1])
    _, maps = recording(planted, positive, negative, latent, steps=4, cfg=1.0)
    mask_module = pack_module("masks.attention_mask")
    mask = nodes.AttentionMask().run(maps, "cat", mask_module.DEFAULT_BLUR, mask_module.DEFAULT_THRESHOLD, "union")[0]
    scale = 16 if variant == "wan22_5b" else 8
    decoded = wan_host.decoded_shape(variant, FRAMES, 2 * GRID[0], 2 * GRID[1])
    assert mask.shape == (2 * decoded[0], *decoded[1:])  # batch-major, frame for frame with VAE Decode
    expected = expected_masks(regions, scale).flatten(0, 1)
    ious = [dit_plant.iou(mask[i], expected[i]) for i in range(mask.shape[0])]
    print(f"{variant} seed {seed}: per-frame IoU min {min(ious):.3f} mean {sum(ious) / len(ious):.3f}")
    assert min(ious) >= 0.9, ious


# ------------------------------------------------------------- frame counts and bad input

@pytest.mark.parametrize("pixel_frames", [1, 5, 9, 33])
@pytest.mark.parametrize("variant", ["wan21", "wan22_5b"])
def test_mask_batch_is_the_decoded_frame_count(variant, pixel_frames):
    latent_frames = (pixel_frames - 1) // 4 + 1
    model = wan_host.model(variant)
    positive, negative = conds(variant, tokens=annotated())
    _, maps = recording(model, positive, negative, wan_host.latent(variant, 1, latent_frames, 4, 6), steps=1)
    decoded = wan_host.decoded_shape(variant, latent_frames, 4, 6)
    assert decoded[0] == pixel_frames
    mask = nodes.AttentionMask().run(maps, "cat", 1.0, 0.0, "union", temporal_smoothing=1.0)[0]
    assert mask.shape == decoded
    for frame in range(pixel_frames):  # each decoded frame shows its latent frame's map
        assert torch.equal(mask[frame], mask[(frame + 3) // 4 * 4 - 3 if frame else 0])
    image = torch.rand(pixel_frames, *decoded[1:], 3)
    overlays = nodes.AttentionHeatmap().run(maps, image, "cat, w0", 0.6)[0]
    assert overlays.shape == (2 * pixel_frames, *decoded[1:], 3)


def test_bad_frame_counts_are_clear_errors():
    model = wan_host.model("wan21")
    positive, negative = conds("wan21", tokens=annotated())
    _, maps = recording(model, positive, negative, wan_host.latent("wan21", 1, 3, 4, 6), steps=1)
    with pytest.raises(ValueError, match=r"6 frames, which Wan's VAE cannot decode.*nearest are 5 and 9"):
        nodes.AttentionHeatmap().run(maps, torch.rand(6, 32, 48, 3), "cat", 0.6)
    with pytest.raises(ValueError, match=r"has 5 frames but the attention maps were recorded on 3 latent frames, "
                                         r"which decode to 9"):
        nodes.AttentionHeatmap().run(maps, torch.rand(5, 32, 48, 3), "cat", 0.6)
    with pytest.raises(ValueError, match=r"has 13 frames but the attention maps were recorded on 3 latent"):
        nodes.AttentionHeatmap().run(maps, torch.rand(13, 32, 48, 3), "cat", 0.6)
    with pytest.raises(ValueError, match="temporal_smoothing"):
        nodes.AttentionMask().run(maps, "cat", 1.0, 0.5, "union", temporal_smoothing=-1.0)
    with pytest.raises(ValueError, match="0 frames, which Wan's VAE cannot decode"):
        video.latent_frame_of(0)
    # (a 4-D latent is one frame to ComfyUI: comfy.sample.fix_empty_latent_channels adds the axis)
    with pytest.raises(ValueError, match=r"3 dimensions .* takes video latents \[batch, channels, frames"):
        recording(model, positive, negative, {"samples": torch.ones(16, 4, 6)}, steps=1)


# ------------------------------------------------------------- umT5 words end to end

def test_attention_text_encode_words_on_wan():
    """Attention Text Encode on (tiny) umT5: CLIP Text Encode's conditioning with word positions;
    recording finds the prompt's real tokens (the rows before ComfyUI's zeroed padding)."""
    dit_text.require_dit_clip("wan")
    clip = dit_text.build_dit_clip("wan")
    with torch.inference_mode():
        positive = encode.AttentionTextEncode().run(clip, "a red fox jumps")[0]
        negative = encode.AttentionTextEncode().run(clip, "")[0]
    pt = positive[0][1][tokens_mod.ANNOTATION_KEY]
    real = pt.end_positions[0] + 1
    assert positive[0][0].shape[1] == wan_host.TEXT_LEN and float(positive[0][0][0, real:].abs().max()) == 0
    _, maps = recording(wan_host.model("wan21"), positive, negative, wan_host.latent("wan21", 1, 2, 4, 6), steps=1)
    assert torch.allclose(maps.probs[..., :real].sum(-1), torch.ones(()), atol=1e-5)
    assert float(maps.probs[..., real:].abs().max()) == 0
    assert maps.word_map("fox").shape == (1, 2, 2, 3)
    mask = nodes.AttentionMask().run(maps, "red fox", 1.0, 0.5, "union")[0]
    assert mask.shape == (5, 32, 48)


# ------------------------------------------------------------- Wan 2.2 14B: two experts, one map

def test_two_expert_samplers_make_one_map():
    """High-noise expert for steps 0-2 of 4, low-noise expert for 2-4 (KSampler (Advanced)'s
    settings): the latent is two core KSamplerAdvanced calls', bit for bit, and the second
    sampler's maps, continuing the first's, are the mean over all 4 steps."""
    from ae_testlib import registry

    high, low = wan_host.model("wan21", 0), wan_host.model("wan21", 1)  # the experts: 2.1 architecture
    positive, negative = conds("wan21", tokens=annotated())
    latent = wan_host.latent("wan21", 1, 2, 6, 10)
    core = registry.core_nodes()["KSamplerAdvanced"]()
    node = nodes.KSamplerAdvancedRecordAttention()
    common_inputs = dict(noise_seed=3, steps=4, cfg=rec.CFG, sampler_name="euler", scheduler="simple",
                         positive=positive, negative=negative)
    first = dict(add_noise="enable", start_at_step=0, end_at_step=2, return_with_leftover_noise="enable")
    second = dict(add_noise="disable", start_at_step=2, end_at_step=10000, return_with_leftover_noise="disable")
    record = dict(resolution="1/4 (16x16 at 512 px on SD1.x)", layers="down + up", branch="cond", dit_blocks="all")
    with torch.inference_mode():
        plain_mid = core.sample(high, latent_image=latent, **common_inputs, **first)[0]
        plain_out = core.sample(low, latent_image=plain_mid, **common_inputs, **second)[0]
        mid, maps_high = node.run(high, latent_image=latent, **common_inputs, **first, **record)
        out, maps_both = node.run(low, latent_image=mid, **common_inputs, **second, **record,
                                  attention_maps=maps_high)
        _, maps_low = node.run(low, latent_image=mid, **common_inputs, **second, **record)
    assert torch.equal(mid["samples"], plain_mid["samples"]) and torch.equal(out["samples"], plain_out["samples"])
    assert maps_high.count == maps_low.count == 2 * wan_host.DEPTH  # 2 steps x 3 blocks, one cond chunk each
    assert maps_both.count == maps_high.count + maps_low.count
    expected = (maps_high.probs * maps_high.count + maps_low.probs * maps_low.count) / maps_both.count
    assert torch.allclose(maps_both.probs, expected, atol=1e-6)
    assert maps_both.probs.shape == maps_high.probs.shape  # memory independent of steps and stages
    with pytest.raises(ValueError, match="'attention_maps' cannot be continued here: it was recorded on Wan"):
        node.run(low, latent_image=wan_host.latent("wan21", 1, 3, 6, 10), **common_inputs, **second, **record,
                 attention_maps=maps_high)
