"""InstDiffEdit on Wan video (video-to-video) on the real ComfyUI host: tiny random-weight Wan 2.1 and
Wan 2.2 5B models from ComfyUI's classes (ae_testlib.wan_host), a planted word region that moves
from frame to frame (test_wan_record's), masks per latent frame blended every step, the final MASK
one per decoded frame."""
import pytest
import torch

import test_wan_record as wr
from ae_testlib import dit_plant, wan_host
from ae_testlib.pack import pack_module

ide = pack_module("samplers.instdiffedit")
capture_mod = pack_module("samplers.instdiffedit_capture")
ide_nodes = pack_module("nodes.instdiffedit")
record = pack_module("samplers.record")
video = pack_module("masks.video")

COPIES = 2
FRAMES, GRID = wr.FRAMES, wr.GRID  # 3 latent frames (9 decoded), 16 x 20 tokens (32 x 40 latent)


@pytest.fixture(autouse=True)
def _wan(comfy_host):
    wan_host.require_wan_host()


def channels(variant):
    return 48 if variant == "wan22_5b" else 16


def source(variant, batch=2, frames=FRAMES, height=2 * GRID[0], width=2 * GRID[1], seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, channels(variant), frames, height, width, generator=generator)}


def regions():
    """Video 0's block moves right, video 1's left and down (test_wan_record.moving_region)."""
    return torch.stack([wr.moving_region(0), wr.moving_region(1)])


def edit(model, latent, seed=1, copies=COPIES, strength=0.5, **kwargs):
    positive = wan_host.conditioning(wr.N_REAL, seed=seed + 10, tokens=wr.annotated())
    negative = wan_host.conditioning(3, seed=seed + 20)
    options = {"steps": 8, "sampler_name": "euler", "scheduler": "normal", "copies": copies, **kwargs}
    with torch.inference_mode():
        return ide.sample_instdiffedit(model, positive, negative, latent, seed, cfg=1.0, strength=strength,
                                       **options)


def planted(variant, seed, beta, copies=COPIES, depth=None, noise=0.0):
    """The model with "cat" planted on each video's moving region (each copy its video's region)."""
    model = wan_host.model(variant, seed, depth)
    return wan_host.plant(model, regions().repeat_interleave(copies, 0), [wr.WORD], beta=beta, noise=noise,
                          noise_seed=seed, n_real=wr.N_REAL)


def frame_ious(mask, scale):
    """Per decoded frame IoU of the node's MASK [2 * 9, H, W] against the planted regions."""
    expected = wr.expected_masks(regions(), scale).flatten(0, 1)
    assert mask.shape == expected.shape
    return [dit_plant.iou(mask[i], expected[i]) for i in range(mask.shape[0])]


PLANTED = [  # variant, weight seed, planted logit bias: 3 seeds and two strengths per variant
    ("wan21", 0, 4.0), ("wan21", 1, 8.0), ("wan21", 2, 4.0),
    ("wan22_5b", 0, 8.0), ("wan22_5b", 1, 4.0), ("wan22_5b", 2, 8.0),
]


@pytest.mark.parametrize("variant,seed,beta", PLANTED, ids=[f"{v}-seed{s}-beta{b:g}" for v, s, b in PLANTED])
def test_planted_moving_region_found_in_every_frame(variant, seed, beta):
    """Batch 2 (a different moving region per video), non-square frames, 3 weight seeds, two planting
    strengths, the released 30 blocks (the default recorded blocks 24-28): every latent frame picks
    "cat", and every decoded frame of the final MASK has IoU >= 0.8 with its planted region."""
    model = planted(variant, seed, beta, depth=wan_host.REAL_DEPTH)
    latent = source(variant)
    with torch.inference_mode():
        out, mask, strip = ide_nodes.InstDiffEdit().run(
            model, wan_host.conditioning(wr.N_REAL, seed=seed + 10, tokens=wr.annotated()),
            wan_host.conditioning(3, seed=seed + 20), latent, 1, 8, 0.5, 1.0, "euler", "normal", COPIES,
            0.9, 0.6, 0.2, "official (step's sigma)")
    scale = 16 if variant == "wan22_5b" else 8
    decoded = wan_host.decoded_shape(variant, FRAMES, 2 * GRID[0], 2 * GRID[1])
    assert mask.shape == (2 * decoded[0], *decoded[1:])  # frame for frame with VAE Decode
    assert out["samples"].shape == latent["samples"].shape
    assert strip.shape[0] == 2 * decoded[0]
    ious = frame_ious(mask, scale)
    print(f"{variant} beta {beta} seed {seed}: per-frame IoU min {min(ious):.3f} mean {sum(ious) / len(ious):.3f}")
    assert min(ious) >= 0.8, ious


@pytest.mark.parametrize("variant", ["wan21", "wan22_5b"])
def test_noisy_attention_still_finds_the_word(variant):
    """Every (video token, text key) logit with fixed noise of std 1, as real attention varies per
    token: the padding keys' share (the start map) still picks "cat" in every frame and the mask
    holds (IoU >= 0.8 in every decoded frame). '</s>''s map alone, the image DiTs' rule, picked a
    filler word here (docs/instdiffedit.md, "Wan video")."""
    model = planted(variant, 1, 4.0, depth=wan_host.REAL_DEPTH, noise=1.0)
    result = edit(model, source(variant), seed=1)
    assert result.index.tolist() == [wr.WORD + 1] * (2 * FRAMES)
    scale = 16 if variant == "wan22_5b" else 8
    ious = frame_ious(video.pixel_frame_masks(result.mask.float(), scale), scale)
    print(f"{variant} noisy: per-frame IoU min {min(ious):.3f} mean {sum(ious) / len(ious):.3f}")
    assert min(ious) >= 0.8, ious


def test_word_picked_in_every_latent_frame():
    """Each latent frame runs the refinement of its own: the chosen word is "cat" in every frame of
    both videos, and the masks have a frame axis at latent size."""
    result = edit(planted("wan21", 0, 4.0, depth=wan_host.REAL_DEPTH), source("wan21"))
    cat = wr.WORD + 1  # 1-based word index
    assert result.index.tolist() == [cat] * (2 * FRAMES)
    assert result.mask.shape == (2, FRAMES, 2 * GRID[0], 2 * GRID[1]) and result.frames == FRAMES
    assert result.step_masks.shape == (4, 2, FRAMES, 2 * GRID[0], 2 * GRID[1])
    expected = wr.expected_masks(regions(), 1)[:, [0, 1, 5]]  # latent frames at latent size (token = 2 cells)
    for b in range(2):
        for f in range(FRAMES):
            assert dit_plant.iou(result.mask[b, f], expected[b, f]) >= 0.8


@pytest.mark.parametrize("variant", ["wan21", "wan22_5b"])
@pytest.mark.parametrize("background", ["official", "matching"])
def test_outside_the_mask_follows_the_source(variant, background):
    """Every model input equals the source noised with the copy's noise outside the previous step's
    mask, bit for bit; the output keeps the source (matching) or its noised version (official)
    outside the final mask."""
    model = planted(variant, 0, 8.0).clone()
    latent = source(variant, seed=4)
    inputs = []

    def wrapper(apply_model, args):
        inputs.append(args["input"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    result = edit(model, latent, background=background)
    sigmas = [float(s) for s in result.sigmas]
    assert len(inputs) == len(sigmas) - 1
    import comfy.sample

    batch = model.model.process_latent_in(latent["samples"].repeat_interleave(COPIES, 0))
    noise = comfy.sample.prepare_noise(batch, 1)

    def noised(sigma):
        return model.model.model_sampling.noise_scaling(torch.tensor(sigma), noise, batch)

    for k in range(1, len(sigmas) - 1):
        expected = noised(sigmas[k - 1] if background == "official" else sigmas[k])
        outside = (result.step_masks[k - 1] == 0).repeat_interleave(COPIES, 0)[:, None].expand_as(expected)
        assert outside.any() and not outside.all()
        assert torch.equal(inputs[k][outside], expected[outside])
    outside = (result.mask == 0)[:, None].expand_as(result.samples)
    if background == "matching":
        torch.testing.assert_close(result.samples[outside], latent["samples"][outside], rtol=0, atol=1e-5)
    else:
        final = model.model.process_latent_out(noised(sigmas[-2]))[::COPIES]
        torch.testing.assert_close(result.samples[outside], final[outside], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pixel_frames", [1, 5, 9, 33])
@pytest.mark.parametrize("variant", ["wan21", "wan22_5b"])
def test_mask_batch_is_the_decoded_frame_count(variant, pixel_frames):
    """The MASK has one mask per frame ComfyUI's own Wan VAE decodes (batch 1 here), at pixel size."""
    latent_frames = (pixel_frames - 1) // 4 + 1
    decoded = wan_host.decoded_shape(variant, latent_frames, 4, 6)
    assert decoded[0] == pixel_frames
    model = wan_host.model(variant)
    latent = source(variant, 1, latent_frames, 4, 6)
    with torch.inference_mode():
        _, mask, strip = ide_nodes.InstDiffEdit().run(
            model, wan_host.conditioning(wr.N_REAL, seed=1, tokens=wr.annotated()), wan_host.conditioning(3, seed=2),
            latent, 1, 2, 0.5, 1.0, "euler", "normal", 1, 0.9, 0.6, 0.2, "official (step's sigma)")
    assert mask.shape == decoded and strip.shape[0] == pixel_frames
    for frame in range(pixel_frames):  # each decoded frame shows its latent frame's mask
        assert torch.equal(mask[frame], mask[(frame + 3) // 4 * 4 - 3 if frame else 0])


def test_mask_node_on_recorded_video_maps():
    """InstDiffEdit Mask reads Wan maps from KSampler (Record Attention): one mask per decoded frame,
    the refinement of the capture applied per latent frame."""
    model = wan_host.plant(wan_host.model("wan21", 0, wan_host.REAL_DEPTH), regions(), [wr.WORD], beta=4.0)
    positive = wan_host.conditioning(wr.N_REAL, seed=10, tokens=wr.annotated())
    negative = wan_host.conditioning(3, seed=20)
    with torch.inference_mode():
        _, maps = record.sample_recording(model, 1, 4, 1.0, "euler", "normal", positive, negative, source("wan21"),
                                          normalise="joint")
        (mask,) = ide_nodes.InstDiffEditMask().run(maps, 0.9, 0.6, 0.2)
        _, text_maps = record.sample_recording(model, 1, 1, 1.0, "euler", "normal", positive, negative,
                                               source("wan21"))
    with pytest.raises(ValueError, match=r"normalisation 'text'; InstDiffEdit on Wan reads the rows over all keys.*"
                                         r"'joint \(all keys\)'"):
        ide_nodes.InstDiffEditMask().run(text_maps, 0.9, 0.6, 0.2)
    assert maps.frames == FRAMES
    assert min(frame_ious(mask, 8)) >= 0.8
    direct = capture_mod.capture_for_maps(maps)
    expected = direct.to_latent(direct.refine(maps.probs, (0.9, 0.6, 0.2)).mask, maps.latent_hw)
    assert torch.equal(mask, video.pixel_frame_masks(expected.float(), 8))


def test_video_noise_mask_per_decoded_frame():
    """A Set Latent Noise Mask mask per decoded frame (Attention Mask's output) is taken per video:
    a latent frame is regenerated where any of its 4 pixel frames is; outside it the result is the
    source, whatever InstDiffEdit's own mask says."""
    latent = source("wan21")
    keep = torch.zeros(2, 9, 2 * GRID[0], 2 * GRID[1])
    keep[0, 5, :, :20] = 1  # video 0: only the left half of latent frame 2 (pixel frame 5) may change
    keep[1, :, 10:, :] = 1  # video 1: the lower part of every frame
    latent["noise_mask"] = keep.reshape(-1, 1, 2 * GRID[0], 2 * GRID[1])
    result = edit(planted("wan21", 0, 8.0), latent, background="matching")
    frozen = torch.ones(2, FRAMES, 2 * GRID[0], 2 * GRID[1], dtype=torch.bool)
    frozen[0, 2, :, :20] = False
    frozen[1, :, 10:, :] = False
    frozen = frozen[:, None].expand_as(result.samples)
    torch.testing.assert_close(result.samples[frozen], latent["samples"][frozen], rtol=0, atol=1e-5)
    assert not torch.allclose(result.samples[~frozen], latent["samples"][~frozen], atol=1e-3)


def test_bad_input_is_a_clear_error():
    model = wan_host.model("wan21")
    latent = source("wan21", 1)
    latent["noise_mask"] = torch.ones(6, 1, 2 * GRID[0], 2 * GRID[1])
    with pytest.raises(ValueError, match=r"noise mask \(per video, 1 video\(s\)\) has 6 frames, which Wan's VAE "
                                         r"cannot decode.*nearest are 5 and 9"):
        edit(model, latent)
    latent = source("wan21", 2)
    latent["noise_mask"] = torch.ones(5, 1, 2 * GRID[0], 2 * GRID[1])
    with pytest.raises(ValueError, match=r"noise mask has 5 masks, but the source is 2 video\(s\) of 3 latent frames "
                                         r"\(9 decoded frames each\): connect 1 mask .* 18 .* or 6"):
        edit(model, latent)
    with pytest.raises(ValueError, match=r"takes video latents \[batch, channels, frames"):
        edit(model, {"samples": torch.randn(16, 3, 6)})
    with pytest.raises(ValueError, match="48 channels"):
        edit(model, source("wan22_5b", 1))
