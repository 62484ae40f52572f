"""Latents and reference latents that a model cannot take are refused by the pack, naming the
input and the fix, before ComfyUI's model code runs (which would fail with a bare reshape /
unpack / "Sizes of tensors must match" error). Issue 21, item 6."""
import pytest
import torch

import node_calls
from ae_testlib import dit_host, fixtures
from ae_testlib.pack import pack_module
from node_calls import call, inputs

tokens_mod = pack_module("attention.tokens")


@pytest.fixture(autouse=True)
def _dit_host(comfy_host):
    dit_host.require_dit_host()


def guarded(model):
    """A clone whose model code fails the test if it runs: the pack's check must come first."""
    import comfy.patcher_extension

    def never(executor, *args, **kwargs):
        raise AssertionError("ComfyUI's model code ran before the pack's check")

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_guard", never)
    return clone


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def prompt(n_tokens=7):
    """An annotated DiT prompt 'a cat' (one token a word, then end / padding tokens)."""
    words = [tokens_mod.Word("a", (0,), index=0), tokens_mod.Word("cat", (1,), index=1)]
    tokens = tokens_mod.PromptTokens("a cat", ["a", "cat"] + ["<pad>"] * (n_tokens - 2), words)
    return dit_host.conditioning(n_tokens, 1, tokens=tokens), dit_host.conditioning(n_tokens, 2)


def record(family, samples):
    positive, negative = prompt()
    return call("AttentionEditKSamplerRecord", **node_calls.record_inputs(
        model=guarded(dit_host.model(family)), positive=positive, negative=negative,
        latent_image={"samples": samples}))


def test_five_dimensional_latent_into_flux_recording():
    with pytest.raises(ValueError, match=r"'latent_image' latent has 5 dimensions \(shape \(1, 16, 1, 6, 10\)\) "
                                         r"but Flux takes image latents \[batch, channels, height, width\]"):
        record("flux", randn(1, 16, 1, 6, 10))


def test_two_frame_latent_into_qwen_image_recording():
    with pytest.raises(ValueError, match=r"'latent_image' latent has 2 frames .* Qwen-Image takes image latents "
                                         r"\[batch, channels, 1, height, width\] \(one frame\)"):
        record("qwen", randn(1, 16, 2, 6, 10))


def test_five_dimensional_latent_into_flux_instdiffedit():
    positive, negative = prompt()
    with pytest.raises(ValueError, match=r"'source' latent has 5 dimensions .* but Flux takes image latents"):
        call("AttentionEditInstDiffEdit", **inputs(
            "AttentionEditInstDiffEdit", model=guarded(dit_host.model("flux")), positive=positive,
            negative=negative, source={"samples": randn(1, 16, 1, 8, 8)}))


def test_foi_dit_refuses_an_sd_latent():
    four = node_calls.latent(channels=4, hw=(8, 12))  # random, so ComfyUI's empty-latent fix leaves it
    with pytest.raises(ValueError, match="'latent_image' latent has 4 channels but this model works on 16-channel"):
        call("AttentionEditFoIDiTSampler", **inputs("AttentionEditFoIDiTSampler", model=guarded(dit_host.model("flux")),
                                                    latent_image=four))


def test_foi_dit_guider_refuses_an_sd_latent_at_sampling():
    """The guider form (SamplerCustomAdvanced) checks the latent it is given too."""
    import comfy.samplers

    guider, = call("AttentionEditFoIDiTGuider", **inputs("AttentionEditFoIDiTGuider",
                                                         model=guarded(dit_host.model("flux"))))
    four = randn(1, 4, 8, 12)
    with torch.inference_mode(), pytest.raises(ValueError, match="'latent_image' latent has 4 channels"):
        guider.sample(torch.randn_like(four), four, comfy.samplers.sampler_object("euler"), torch.tensor([1.0, 0.5, 0.0]))


def test_foi_dit_refuses_an_sd_reference_latent():
    positive, negative = node_calls.kontext_conds()
    sd_ref = [[c, {**d, "reference_latents": [randn(1, 4, 8, 12)]}] for c, d in positive]
    with pytest.raises(ValueError, match=r"'positive' reference latent \(ReferenceLatent.*\) has 4 channels "
                                         "but this model works on 16-channel"):
        call("AttentionEditFoIDiTSampler", **inputs("AttentionEditFoIDiTSampler", model=guarded(dit_host.model("flux")),
                                                    positive=sd_ref, negative=negative))


def test_foi_dit_nan_latent_is_blamed_on_the_latent_not_the_model():
    latent = node_calls.latent(channels=16, hw=(8, 12))
    latent["samples"][0, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"the 'latent_image' latent contains NaN.*VAE Encode") as error:
        call("AttentionEditFoIDiTSampler", **inputs("AttentionEditFoIDiTSampler", model=guarded(dit_host.model("flux")),
                                                    latent_image=latent))
    assert "--bf16-unet" not in str(error.value)


def test_bad_mask_blocks_names_mask_blocks():
    with pytest.raises(ValueError, match=r"^mask_blocks: 'double 99' is outside Flux's double blocks") as error:
        call("AttentionEditFoIDiTSampler", **inputs("AttentionEditFoIDiTSampler", model=guarded(dit_host.model("flux")),
                                                    **node_calls.foi_dit_settings(mask_blocks="double 99")))
    assert "dit_blocks" not in str(error.value)


@pytest.mark.parametrize("family", ["flux", "qwen"])
@pytest.mark.parametrize("key", ["AttentionEditFoISampler", "AttentionEditFoIGuider"])
def test_ip2p_foi_given_a_dit_edit_model_points_to_the_dit_node(key, family):
    name = {"flux": "Flux", "qwen": "Qwen-Image"}[family]
    with pytest.raises(ValueError, match=rf"this model is {name} \(a DiT\).*"
                                         r"'FoI Sampler \(Kontext / Qwen-Image-Edit\)'") as error:
        call(key, **inputs(key, model=guarded(dit_host.model(family))))
    assert "channels" not in str(error.value)  # a DiT's in_channels count patchified pixels


def test_unet_latent_checks_are_unchanged(comfy_host):
    """SD1.x still takes [B, 4, H, W] and refuses a 5-D latent by the same check."""
    model = fixtures.model("sd15")
    common = pack_module("samplers.common")
    assert common.check_latent(model, torch.zeros(1, 4, 8, 8), "latent_image").dim() == 4
    with pytest.raises(ValueError, match=r"has 5 dimensions .* this model takes image latents \[batch, channels"):
        common.check_latent(model, torch.zeros(1, 4, 1, 8, 8), "latent_image")
