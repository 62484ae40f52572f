"""InstDiffEdit sampler and nodes on the real ComfyUI host (tiny random-weight models, CPU)."""
import pytest
import torch

from ae_testlib import fixtures, host
from ae_testlib.pack import pack_module

ide = pack_module("samplers.instdiffedit")
idm = pack_module("masks.instdiffedit")
nodes = pack_module("nodes")
ide_nodes = pack_module("nodes.instdiffedit")

PROMPT = "a photo of a red cat"
STEPS, STRENGTH = 8, 0.5  # 4 denoising steps


def source(batch=2, height=16, width=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, 4, height, width, generator=generator)}


def conds(family="sd15", prompt=PROMPT):
    return fixtures.encode(family, prompt), fixtures.encode(family, "")


def run(model=None, latent=None, positive=None, negative=None, family="sd15", **kwargs):
    model = model or fixtures.model(family)
    default_positive, default_negative = conds(family)
    kwargs = {"steps": STEPS, "strength": STRENGTH, "sampler_name": "euler", "scheduler": "normal",
              **kwargs}
    with torch.inference_mode():
        return ide.sample_instdiffedit(model, positive or default_positive, negative or default_negative,
                                       latent or source(), 0, **kwargs)


@pytest.fixture(scope="module")
def sd15(comfy_host):
    return fixtures.model("sd15")


def test_mask_every_step_position_frozen_after_first(sd15, monkeypatch):
    calls = []
    original = idm.refine_mask

    def spy(attn, *args, position=None, **kwargs):
        result = original(attn, *args, position=position, **kwargs)
        calls.append((None if position is None else position.clone(), result))
        return result

    monkeypatch.setattr(idm, "refine_mask", spy)
    result = run(sd15)
    steps = int(STEPS * STRENGTH)
    assert len(result.sigmas) == steps + 1 and float(result.sigmas[-1]) == 0.0
    assert len(calls) == steps and result.step_masks.shape == (steps, 2, 16, 16)
    first_position, first = calls[0]
    assert first_position is None and first.index is not None  # P computed at the first step
    for position, later in calls[1:]:  # ... then frozen: passed in, never recomputed
        assert torch.equal(position, first.position) and later.index is None
        assert torch.equal(later.position, first.position)
    assert torch.equal(result.position, first.position)
    for (_, step_result), step_mask in zip(calls, result.step_masks):
        assert step_result.mask.shape == (2, 16, 16)  # maps 4x4 -> mask 16x16 = latent
        assert torch.equal(step_result.mask, step_mask)
        # the copies were averaged: one map per image
        assert step_result.word_maps.shape[0] == 2
    assert set(result.step_masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(result.mask, result.step_masks[-1])


def _expected_background(model, latent, seed, copies, sigma):
    import comfy.sample

    batch = latent["samples"].repeat_interleave(copies, 0)
    noise = comfy.sample.prepare_noise(batch, seed)
    inner = model.model
    noised = inner.model_sampling.noise_scaling(torch.tensor(sigma), noise, inner.process_latent_in(batch))
    return noised  # model latent space


@pytest.mark.parametrize("background", ["official", "matching"])
def test_every_evaluation_sees_the_source_outside_the_previous_mask(sd15, background):
    """Step k's model input equals the source noised with the copy's noise outside mask k-1,
    to sigma_k-1 (official off-by-one) or sigma_k (matching); the output likewise after the last step."""
    latent, copies = source(), 3
    inputs = []
    patched = sd15.clone()

    def wrapper(apply_model, args):
        sigma = float(args["c"]["transformer_options"]["sigmas"].reshape(-1)[0])
        inputs.append((sigma, args["input"][:latent["samples"].shape[0] * copies].clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(wrapper)
    result = run(patched, latent, background=background, phi=0.5, copies=copies)
    sigmas = [float(s) for s in result.sigmas]
    assert [s for s, _ in inputs] == pytest.approx(sigmas[:-1])  # one evaluation per euler step
    outside_seen = 0
    for k in range(1, len(sigmas) - 1):
        target_sigma = sigmas[k - 1] if background == "official" else sigmas[k]
        expected = _expected_background(sd15, latent, 0, copies, target_sigma)
        outside = (result.step_masks[k - 1] == 0).repeat_interleave(copies, 0)[:, None].expand_as(expected)
        outside_seen += int(outside.sum())
        torch.testing.assert_close(inputs[k][1][outside], expected[outside], rtol=0, atol=1e-5)
        inside = ~outside
        assert not torch.allclose(inputs[k][1][inside], expected[inside])
    assert outside_seen > 0

    final_sigma = sigmas[-2] if background == "official" else 0.0
    expected = sd15.model.process_latent_out(_expected_background(sd15, latent, 0, copies, final_sigma))
    outside = (result.mask == 0).repeat_interleave(copies, 0)[:, None].expand_as(expected)
    assert outside.any() and not outside.all()
    torch.testing.assert_close(result.all_samples[outside], expected[outside], rtol=0, atol=1e-5)
    if background == "matching":  # the output keeps the source itself outside the mask
        kept = (result.mask == 0)[:, None].expand_as(result.samples)
        torch.testing.assert_close(result.samples[kept], latent["samples"][kept], rtol=0, atol=1e-5)
    assert torch.equal(result.samples, result.all_samples[::copies])


def test_two_images_give_two_masks(sd15):
    result = run(sd15, source(batch=2, seed=3), phi=0.5)
    assert result.mask.shape == (2, 16, 16) and result.samples.shape == (2, 4, 16, 16)
    assert not torch.equal(result.mask[0], result.mask[1])
    assert result.position.shape == (2, 8)  # [BOS, a, photo, of, a, red, cat, EOS] per image


@pytest.mark.parametrize("height,width", [(12, 20), (10, 13)])
def test_non_square_and_odd_latents(sd15, height, width):
    with torch.inference_mode():
        latent, mask, strip = ide_nodes.InstDiffEdit().run(
            sd15, *conds(), source(2, height, width), 0, STEPS, STRENGTH, 7.5, "euler", "normal", 2,
            0.9, 0.6, 0.2, "official (step's sigma)")
    assert latent["samples"].shape == (2, 4, height, width)
    assert mask.shape == (2, 8 * height, 8 * width) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    steps = int(STEPS * STRENGTH)
    assert strip.shape == (2, height, steps * (width + 1) - 1, 3)
    assert torch.equal(strip[:, :, -width:, 0], mask[:, ::8, ::8])  # last frame = final mask


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_families(comfy_host, family):
    model = fixtures.model(family)
    with torch.inference_mode():
        latent, mask, strip = ide_nodes.InstDiffEdit().run(
            model, *conds(family), source(1, 16, 16), 5, STEPS, STRENGTH, 5.0, "lms", "normal", 2,
            0.9, 0.6, 0.2, "matching (next sigma)")
    assert latent["samples"].shape == (1, 4, 16, 16) and torch.isfinite(latent["samples"]).all()
    assert mask.shape == (1, 128, 128)
    assert strip.shape[0] == 1 and strip.shape[-1] == 3


@pytest.mark.parametrize("sampler_name,scheduler", [("euler_ancestral", "karras"), ("heun", "normal"),
                                                    ("dpmpp_2m", "karras"), ("uni_pc", "simple")])
def test_other_samplers(sd15, sampler_name, scheduler):
    result = run(sd15, source(1), sampler_name=sampler_name, scheduler=scheduler, copies=2)
    assert result.step_masks.shape == (len(result.sigmas) - 1, 1, 16, 16)
    assert torch.isfinite(result.samples).all()


def test_model_options_untouched_and_runs_repeat(sd15):
    before_options = repr(sd15.model_options)
    before_patches = dict(sd15.patches)
    first = run(sd15, copies=2)
    assert repr(sd15.model_options) == before_options and sd15.patches == before_patches
    second = run(sd15, copies=2)
    assert torch.equal(first.all_samples, second.all_samples)
    assert torch.equal(first.step_masks, second.step_masks)


def _tiny_controlnet(model):
    import comfy.cldm.cldm as cldm
    import comfy.controlnet
    import comfy.ops

    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    control_model = cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config)
    host._init_weights(control_model, 7)
    cpu = torch.device("cpu")
    return comfy.controlnet.ControlNet(control_model, load_device=cpu, manual_cast_dtype=None)


def _with_control(conditioning, control):
    # what ControlNetApply(Advanced) does: the ControlNet travels in the cond dicts
    return [[cond, {**options, "control": control, "control_apply_to_uncond": True}]
            for cond, options in conditioning]


def test_lora_patched_model_and_controlnet_conditioning(sd15):
    positive, negative = conds()
    plain = run(sd15, source(1), copies=2)

    lora = sd15.clone()  # a LoRA is weight patches on a clone (LoraLoader): add one
    key = next(k for k in lora.model.state_dict() if k.endswith("attn2.to_k.weight"))
    weight = lora.model.state_dict()[key]
    lora.add_patches({key: (torch.full_like(weight, 0.05),)}, 1.0)
    seen = []
    lora.set_model_attn2_output_patch(lambda out, extra: seen.append(1) or out)  # another node's patch
    patched = run(lora, source(1), copies=2)
    assert seen and not torch.equal(patched.all_samples, plain.all_samples)

    control = _tiny_controlnet(sd15).copy().set_cond_hint(torch.rand(1, 3, 128, 128), 1.0)
    controlled = run(sd15, source(1), _with_control(positive, control), _with_control(negative, control),
                     copies=2)
    assert torch.isfinite(controlled.all_samples).all()
    assert not torch.equal(controlled.all_samples, plain.all_samples)


def test_errors(sd15):
    positive, negative = conds()
    with pytest.raises(ValueError, match="'positive' prompt .* has no words"):
        run(sd15, positive=fixtures.encode("sd15", ""))
    long_prompt = fixtures.encode("sd15", " ".join(f"word{i}" for i in range(60)))
    with pytest.raises(ValueError, match="positive.*one 77-token chunk.*Shorten"):
        run(sd15, positive=long_prompt)
    plain = [[positive[0][0], {"pooled_output": positive[0][1]["pooled_output"]}]]
    with pytest.raises(ValueError, match="Attention Text Encode"):
        run(sd15, positive=plain)
    with pytest.raises(ValueError, match="'source' latent has 16 channels.*4-channel"):
        run(sd15, {"samples": torch.randn(1, 16, 16, 16)})
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"'strength' must be in \(0, 1\]"):
            run(sd15, strength=strength)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        run(sd15, steps=3, strength=0.2)
    with pytest.raises(ValueError, match="'source' latent is 4x4.*1x1.*at least 2x2"):
        run(sd15, source(1, 4, 4))
    with pytest.raises(ValueError, match="'theta_lo'"):
        run(sd15, theta_hi=0.5, theta_lo=0.7)


def test_strength_one_and_full_schedule(sd15):
    result = run(sd15, source(1), steps=4, strength=1.0, copies=1)
    assert len(result.sigmas) == 5 and result.step_masks.shape[0] == 4


def _record(model, latent, resolution):
    record_node = nodes.record.KSamplerRecordAttention()
    resolution_name = next(name for name, level in pack_module("nodes.common").LEVELS.items()
                           if level == resolution)
    with torch.inference_mode():
        _, maps = record_node.run(model, 0, 3, 7.5, "euler", "normal", *conds(), latent, 1.0,
                                  resolution_name, "down + up", "cond")
    return maps


def test_mask_node_from_attention_maps(sd15):
    latent = source(2, 12, 20)
    maps = _record(sd15, latent, 2)
    with torch.inference_mode():
        (mask,) = ide_nodes.InstDiffEditMask().run(maps, 0.9, 0.6, 0.2)
    assert mask.shape == (2, 96, 160) and set(mask.unique().tolist()) <= {0.0, 1.0}
    groups, eos = pack_module("samplers.instdiffedit_capture").word_groups(maps.tokens)
    direct = idm.refine_mask(maps.probs, groups, eos, 0.9, 0.6, 0.2).mask
    assert torch.equal(mask[:, ::8, ::8], direct)

    with pytest.raises(ValueError, match="1/2 of the latent.*1/4"):
        ide_nodes.InstDiffEditMask().run(_record(sd15, latent, 1), 0.9, 0.6, 0.2)


def test_nodes_registered():
    mappings = nodes.NODE_CLASS_MAPPINGS
    assert mappings["AttentionEditInstDiffEdit"] is ide_nodes.InstDiffEdit
    assert mappings["AttentionEditInstDiffEditMask"] is ide_nodes.InstDiffEditMask
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["AttentionEditInstDiffEdit"] == "InstDiffEdit"
