"""Regression tests of issue 12 (bad or unusual inputs, faults mid-run), nodes called as ComfyUI
calls them: a correct result or a clear error that names the input and the fix."""
import logging
import math
import re

import pytest
import torch

import node_calls
from ae_testlib import fixtures, host, registry
from ae_testlib.pack import pack_module

host.import_host()

validate = pack_module("masks.validate")
masks_foi = pack_module("masks.foi")
losses = pack_module("masks.magedit_losses")
foi_modulation = pack_module("attention.foi_modulation")
instructions = pack_module("attention.instructions")
tokens_mod = pack_module("attention.tokens")
maps_mod = pack_module("attention.maps")
recorder_mod = pack_module("attention.recorder")
layers_mod = pack_module("attention.layers")
common = pack_module("samplers.common")
magedit = pack_module("samplers.magedit")
grad = pack_module("samplers.grad")

call, inputs = node_calls.call, node_calls.inputs


# --------------------------------------------------------------------------------------------
# The bug: FoI sub-instructions of exactly two tokens
# --------------------------------------------------------------------------------------------

def test_two_token_subinstruction_keeps_its_keyword_mask_and_alpha(comfy_host):
    parsed = instructions.parse_instructions(fixtures.clip("sd15"), "remove *hat*; make the *sky* blue")
    (remove, hat), sky = parsed.spans[0], parsed.keyword_positions[1][0]
    assert parsed.spans[0] == (1, 2) and parsed.keyword_positions[0] == (hat,) == (2,)
    assert masks_foi.token_indices(parsed.spans[0], 77) == [1, 2]  # two positions, not a range

    keyword_masks = torch.zeros(1, 2, 4, 4)
    keyword_masks[0, 0, :2] = 1  # hat: top half
    keyword_masks[0, 1, 2:, :2] = 1  # sky: bottom left
    region = masks_foi.token_region_mask(keyword_masks, parsed.spans, 77, (4, 4))
    own = keyword_masks[0, 0].flatten()
    assert torch.equal(region[0, :, hat], own) and torch.equal(region[0, :, remove], own)
    assert torch.equal(region[0, :, sky], keyword_masks[0, 1].flatten())
    union = keyword_masks[0].amax(0).flatten()
    assert not torch.equal(own, union)  # the mask the bug gave 'hat' differs from its own

    alpha = foi_modulation.token_alpha([0.5, 2.0], parsed.spans, 77)
    assert alpha[remove] == alpha[hat] == 0.5 and alpha[sky] == 2.0 and alpha[0] == 1.0


# --------------------------------------------------------------------------------------------
# Numeric inputs are checked by the functions, by the names the nodes show
# --------------------------------------------------------------------------------------------

def _numeric_inputs():
    classes, _ = registry.pack_nodes()
    for key, cls in sorted(classes.items()):
        for name, spec in cls.INPUT_TYPES()["required"].items():
            if spec[0] == "FLOAT":
                yield key, name


# (node, input, value): outside the valid range, which the UI's limits do not enforce from the API
OUT_OF_RANGE = [
    ("AttentionEditKSamplerRecord", "steps", 0), ("AttentionEditKSamplerRecord", "denoise", 0.0),
    ("AttentionEditKSamplerRecord", "denoise", 1.5), ("AttentionEditKSamplerRecord", "cfg", -1.0),
    ("AttentionEditHeatmap", "opacity", 1.5), ("AttentionEditHeatmap", "opacity", -0.1),
    ("AttentionEditMask", "threshold", 1.5), ("AttentionEditMask", "threshold", -0.5),
    ("AttentionEditMask", "blur", -1.0), ("AttentionEditMask", "blur", 1e6),
    ("AttentionEditInstDiffEdit", "strength", 0.0), ("AttentionEditInstDiffEdit", "theta_hi", 1.5),
    ("AttentionEditInstDiffEdit", "copies", 0), ("AttentionEditInstDiffEdit", "steps", 0),
    ("AttentionEditInstDiffEditMask", "theta_lo", -0.5), ("AttentionEditInstDiffEditMask", "phi", 1.0),
    ("AttentionEditFoISampler", "tau", 1.5), ("AttentionEditFoISampler", "gamma", -1),
    ("AttentionEditFoISampler", "blur_kernel", 4), ("AttentionEditFoISampler", "blur_kernel", 0),
    ("AttentionEditFoISampler", "denoise", 0.0), ("AttentionEditFoISampler", "disentangle_fraction", 2.0),
    ("AttentionEditFoISampler", "image_cfg", -1.0), ("AttentionEditFoIGuider", "blur_sigma", -1.0),
    ("AttentionEditInversion", "steps", 0), ("AttentionEditInversion", "inner_iterations", 0),
    ("AttentionEditInversion", "cfg", -2.0),
    ("AttentionEditMAGEdit", "scale", 1e6), ("AttentionEditMAGEdit", "cross_injection", 1.5),
    ("AttentionEditMAGEdit", "self_injection", -0.5), ("AttentionEditMAGEdit", "iterations", -1),
    ("AttentionEditMAGEdit", "steps", 0),
]


@pytest.mark.parametrize("key, name", list(_numeric_inputs()))
def test_nan_in_every_float_input_is_an_error_naming_it(key, name):
    with pytest.raises(ValueError, match=f"'{name}' must be"):
        call(key, **inputs(key, **{name: float("nan")}))


@pytest.mark.parametrize("key, name, value", OUT_OF_RANGE)
def test_out_of_range_inputs_are_errors_naming_input_and_range(key, name, value):
    with pytest.raises(ValueError, match=f"'{name}' must be") as error:
        call(key, **inputs(key, **{name: value}))
    assert "got" in str(error.value) and any(c in str(error.value) for c in "[(<>")  # the range is given


@pytest.mark.parametrize("alpha", ["nan", "1.0, inf", "-1"])
def test_foi_alpha_values_are_checked(alpha):
    with pytest.raises(ValueError, match="'alpha' must be"):
        call("AttentionEditFoIGuider", **inputs("AttentionEditFoIGuider", alpha=alpha))


def test_range_texts():
    assert validate.check_number(0.5, "x", 0.0, 1.0) == 0.5
    assert validate.check_number(3, "n", 1, integer=True) == 3
    with pytest.raises(ValueError, match=r"'x' must be in \(0, 1\]; got 0"):
        validate.check_number(0, "x", 0, 1, low_open=True)
    with pytest.raises(ValueError, match=r"'n' must be a whole number >= 1 \(why\); got 2.5"):
        validate.check_number(2.5, "n", 1, integer=True, hint="why")
    with pytest.raises(ValueError, match="'x' must be a number >= 0; got inf"):
        validate.check_number(math.inf, "x", 0)
    with pytest.raises(ValueError, match="'b' must be"):
        validate.check_number(True, "b", 0, 1)


# --------------------------------------------------------------------------------------------
# NaN from the model mid-run: an error with the cause and fix, never an empty mask
# --------------------------------------------------------------------------------------------

class NaNAfter:
    """A model function wrapper whose UNet output turns NaN from call `start` on (what an fp16
    overflow mid-run does)."""

    def __init__(self, start=1):
        self.start, self.calls = start, 0

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options on some hosts
        return self

    def __call__(self, apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        self.calls += 1
        return out * float("nan") if self.calls > self.start else out


def overflowing(model, start=1):
    clone = model.clone()
    clone.set_model_unet_function_wrapper(NaNAfter(start))
    return clone


OVERFLOW = r"NaN or infinite.*fp16 overflow.*bf16 or fp32"


def test_recording_nan_maps_is_an_error(comfy_host):
    model = overflowing(fixtures.model("sd15"))
    with pytest.raises(ValueError, match="contains " + OVERFLOW):
        call("AttentionEditKSamplerRecord", **inputs("AttentionEditKSamplerRecord", model=model, steps=3))


def test_nan_maps_never_reach_masks_or_heatmaps():
    with pytest.raises(ValueError, match=OVERFLOW):
        maps_mod.AttentionMaps(probs=torch.full((1, 4, 4, 77), float("nan")), tokens=None,
                               latent_hw=(16, 16), level=2)


def test_instdiffedit_nan_mid_run_is_an_error_not_an_empty_mask(comfy_host):
    model = overflowing(fixtures.model("sd15"))
    with pytest.raises(ValueError, match=OVERFLOW):
        call("AttentionEditInstDiffEdit", **inputs("AttentionEditInstDiffEdit", model=model))


class NaNAttention:
    """attn1 output patch that overflows in the first transformer block (fp16 attention overflow)."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, extra_options):
        return n * float("nan")


def test_foi_nan_keyword_maps_at_the_first_step_are_an_error(comfy_host):
    model = fixtures.model("sd15", ip2p=True).clone()
    model.set_model_attn1_output_patch(NaNAttention())
    with pytest.raises(ValueError, match="FoI's keyword attention at the first step.*" + OVERFLOW):
        call("AttentionEditFoISampler", **inputs("AttentionEditFoISampler", model=model))


def test_foi_nan_mid_run_is_an_error(comfy_host):
    model = overflowing(fixtures.model("sd15", ip2p=True))
    with pytest.raises(ValueError, match="FoI's sampled latent.*" + OVERFLOW):
        call("AttentionEditFoISampler", **inputs("AttentionEditFoISampler", model=model))


def test_magedit_nan_mid_run_is_an_error_not_a_preview_crash(comfy_host):
    model = overflowing(fixtures.model("sd15"))  # the joint step's second UNet call overflows
    with pytest.raises(ValueError, match="MAG-Edit.*" + OVERFLOW):
        call("AttentionEditMAGEdit", **inputs("AttentionEditMAGEdit", model=model))


def test_inversion_of_a_latent_with_one_nan_pixel_is_an_error(comfy_host):
    source = node_calls.latent()
    source["samples"][0, 2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="'latent' latent contains NaN.*--fp32-vae"):
        call("AttentionEditInversion", **inputs("AttentionEditInversion", latent=source))


@pytest.mark.parametrize("key, name", [("AttentionEditKSamplerRecord", "latent_image"),
                                       ("AttentionEditInstDiffEdit", "source"),
                                       ("AttentionEditFoISampler", "latent_image")])
def test_nan_in_a_latents_noise_mask_is_an_error(key, name):
    latent = node_calls.latent()
    latent["noise_mask"] = torch.ones(1, 1, 128, 128)
    latent["noise_mask"][0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=f"'{name}' latent's noise mask contains NaN"):
        call(key, **inputs(key, **{name: latent}))


def test_nan_in_a_mask_is_never_inside():
    mask = node_calls.box_mask()
    mask[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'mask' input contains NaN"):
        magedit.prepare_mask(mask, (16, 16), (4, 4))
    grid = torch.ones(16)
    grid[3] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        losses.token_ratio_loss([torch.rand(2, 16, 77)], grid, [[5]])


# --------------------------------------------------------------------------------------------
# Latents of another model family: one check in every sampler, from the model's latent format
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, name", [
    ("AttentionEditKSamplerRecord", "latent_image"), ("AttentionEditInversion", "latent"),
    ("AttentionEditInstDiffEdit", "source"), ("AttentionEditFoISampler", "latent_image"),
])
def test_sixteen_channel_latent_is_a_clear_error(key, name):
    with pytest.raises(ValueError, match=f"'{name}' latent has 16 channels but this model works on "
                                         "4-channel latents.*VAE that matches the model"):
        call(key, **inputs(key, **{name: node_calls.latent(channels=16)}))


def test_foi_source_image_of_another_family_is_a_clear_error():
    positive, negative = node_calls.ip2p_conds(src=torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match="'positive' source image latent.*16 channels"):
        call("AttentionEditFoIGuider", **inputs("AttentionEditFoIGuider", positive=positive, negative=negative))


def test_magedit_inversion_of_another_family_is_a_clear_error():
    import dataclasses

    inversion = node_calls.inversion()
    other = dataclasses.replace(inversion, trajectory=torch.zeros(4, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="'inversion' noise has 16 channels"):
        call("AttentionEditMAGEdit", **inputs("AttentionEditMAGEdit", inversion=other))


def test_channel_count_comes_from_the_models_latent_format(comfy_host):
    import comfy.latent_formats

    model = fixtures.model("sd15").clone()
    assert common.model_latent_channels(model) == 4
    model.add_object_patch("latent_format", comfy.latent_formats.SD3())  # a DiT family's format
    assert common.model_latent_channels(model) == 16
    with pytest.raises(ValueError, match="has 4 channels but this model works on 16-channel"):
        common.check_latent(model, torch.zeros(1, 4, 8, 8), "latent_image")
    assert common.check_latent(model, torch.zeros(1, 16, 8, 8), "latent_image").shape[1] == 16


# --------------------------------------------------------------------------------------------
# The backward state of grad.py stays inside its block
# --------------------------------------------------------------------------------------------

def _inplace_loss(x):
    def loss():
        y = x.sigmoid()  # sigmoid saves its output for backward ...
        y += 1  # ... which this in-place add modifies, as the old host's UNet does
        return y.sum()
    return loss


def _end_block(ending):
    import comfy.model_management

    if ending == "error":
        raise RuntimeError("boom")
    if ending == "interrupt":  # what the Cancel button does to a running prompt
        comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()


@pytest.mark.parametrize("ending", ["normal", "error", "interrupt"])
def test_copy_saved_activations_is_scoped_to_one_block(ending, comfy_host):
    x = grad.leaf(torch.randn(5), requires_grad=True)
    assert grad._block.get() is None
    try:
        with grad.autograd_through(torch.nn.Linear(2, 2)):
            loss, (gradient,) = grad.loss_and_grad(_inplace_loss(x), [x])  # detected, then copied
            assert grad._block.get().copy_saved_activations
            torch.testing.assert_close(gradient, x.sigmoid() * (1 - x.sigmoid()))
            _end_block(ending)
    except Exception as error:  # noqa: BLE001 - the host's interrupt exception class differs
        assert ending != "normal", error
    assert grad._block.get() is None and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with grad.autograd_through(torch.nn.Linear(2, 2)):
        assert not grad._block.get().copy_saved_activations  # a new block starts without copies
        loss, (gradient,) = grad.loss_and_grad(lambda: (x * x).sum(), [x])
        assert not grad._block.get().copy_saved_activations
        torch.testing.assert_close(gradient, 2 * x)


# --------------------------------------------------------------------------------------------
# Textual-inversion embeddings behave as in CLIP Text Encode
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_with_embeddings(tmp_path_factory, comfy_host):
    """A tiny CLIP whose tokenizer reads embeddings from a temporary folder holding one real
    two-vector embedding file, as comfy.sd.CLIP builds it for a checkpoint's embedding folders."""
    import safetensors.torch

    folder = tmp_path_factory.mktemp("embeddings")
    vectors = torch.randn(2, host.TINY_CLIP["hidden_size"], generator=torch.Generator().manual_seed(4))
    safetensors.torch.save_file({"clip_l": vectors}, str(folder / "tinyemb.safetensors"))
    clip = host.build_clip("sd15")
    clip.tokenizer = type(clip.tokenizer)(embedding_directory=[str(folder)])
    return clip


def _clip_text_encode(clip, text):
    core = registry.core_nodes()["CLIPTextEncode"]
    with torch.inference_mode():
        return getattr(core(), core.FUNCTION)(clip, text)[0]


def test_existing_embedding_maps_to_its_vectors(clip_with_embeddings):
    clip = clip_with_embeddings
    text = "a photo of embedding:tinyemb, on a sofa"
    encoded, = call("AttentionEditTextEncode", clip=clip, text=text)
    tokens = tokens_mod.tokens_of(encoded)
    assert tokens.word_list() == ["a", "photo", "of", "embedding:tinyemb,", "on", "a", "sofa"]
    assert tokens.positions("embedding:tinyemb") == [4, 5, 6]  # two vectors and the ','
    assert tokens.token_strings[4:7] == ["<embedding>", "<embedding>", ",</w>"]
    assert tokens.positions("on") == [7] and tokens.positions("sofa") == [9]
    torch.testing.assert_close(encoded[0][0], _clip_text_encode(clip, text)[0][0])


@pytest.mark.parametrize("text, words", [
    ("a photo of embedding:missing on a sofa", ["a", "photo", "of", "on", "a", "sofa"]),
    ("a photo of embedding:missing, on a sofa", ["a", "photo", "of", "embedding:missing,", "on", "a", "sofa"]),
])
def test_missing_embedding_is_ignored_like_clip_text_encode(clip_with_embeddings, caplog, text, words):
    clip = clip_with_embeddings
    with caplog.at_level(logging.WARNING):
        encoded, = call("AttentionEditTextEncode", clip=clip, text=text)
    assert re.search("embedding:missing.* does not exist", caplog.text)  # ComfyUI's own warning
    tokens = tokens_mod.tokens_of(encoded)
    assert tokens.word_list() == words
    assert [tokens.token_strings[p] for p in tokens.positions("sofa")] == ["sofa</w>"]
    torch.testing.assert_close(encoded[0][0], _clip_text_encode(clip, text)[0][0])


def test_instructions_with_embeddings(clip_with_embeddings):
    clip = clip_with_embeddings
    text = "put a *hat* on embedding:missing dog; make *embedding:tinyemb* red"
    parsed = instructions.parse_instructions(clip, text)
    strings = parsed.tokens.token_strings
    assert [strings[p] for p in parsed.spans[0]] == ["put</w>", "a</w>", "hat</w>", "on</w>", "dog</w>"]
    assert [strings[p] for p in parsed.keyword_positions[1]] == ["<embedding>", "<embedding>"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_typed_end_token_is_a_word_not_the_end(family, comfy_host):
    text = "a cat <|endoftext|> on a sofa"  # CLIP Text Encode encodes it; so must the pack
    encoded, = call("AttentionEditTextEncode", clip=fixtures.clip(family), text=text)
    tokens = tokens_mod.tokens_of(encoded)
    assert tokens.word_list() == ["a", "cat", "<|endoftext|>", "on", "a", "sofa"]
    assert tokens.positions("sofa") == [6] and tokens.end_positions == (7,)
    assert tokens.token_strings[3] == "<|endoftext|>" and tokens.token_strings[7] == "<end>"


# --------------------------------------------------------------------------------------------
# Errors that say what is really wrong
# --------------------------------------------------------------------------------------------

def test_maps_of_combined_prompts_say_why_they_have_no_words(comfy_host):
    core = registry.core_nodes()["ConditioningCombine"]
    cat, dog = fixtures.encode("sd15", "a photo of a cat"), fixtures.encode("sd15", "a photo of a dog")
    combined = getattr(core(), core.FUNCTION)(cat, dog)[0]
    _, maps = call("AttentionEditKSamplerRecord", **inputs("AttentionEditKSamplerRecord", positive=combined))
    for key, extra in (("AttentionEditMask", {}), ("AttentionEditInstDiffEditMask", {}),
                       ("AttentionEditHeatmap", {"words": ""})):
        with pytest.raises(ValueError, match="'positive' conditioning joins 2 different prompts.*"
                                             "Conditioning Combine.*with one prompt") as error:
            call(key, **inputs(key, attention_maps=maps, **extra))
        assert "CLIP Text Encode" not in str(error.value)
    with pytest.raises(ValueError, match="joins 2 different prompts"):
        call("AttentionEditInstDiffEdit", **inputs("AttentionEditInstDiffEdit", positive=combined))


def test_nothing_recorded_mentions_steps_and_denoise(comfy_host):
    recorder = recorder_mod.AttentionRecorder()
    with pytest.raises(RuntimeError, match="'steps'.*'denoise' above 0"):
        recorder.maps()


def test_model_without_cross_attention_says_so(comfy_host):
    import comfy.model_patcher
    import comfy.supported_models

    config = host._full_unet_config("sd15", 4)
    config.update(transformer_depth=[0, 0, 0, 0], transformer_depth_output=[0] * 8, transformer_depth_middle=0)
    base = comfy.supported_models.SD15(config).get_model({})
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="no cross-attention layers") as error:
        layers_mod.select_layers(model, 2)
    assert "one of:" not in str(error.value)
    with pytest.raises(ValueError, match=r"at 1/8 of the latent .*it has some at 1/1, 1/2, 1/4 .*'resolution'"):
        layers_mod.select_layers(fixtures.model("sd15"), 3, ("input",))


def test_heatmap_of_every_word_skips_punctuation_and_empty_prompts_say_so(comfy_host):
    _, maps = call("AttentionEditKSamplerRecord",
                   **inputs("AttentionEditKSamplerRecord", positive=fixtures.encode("sd15", "a cat , a red hat")))
    image = torch.full((1, 128, 128, 3), 0.5)
    every, = call("AttentionEditHeatmap", attention_maps=maps, image=image, words="", opacity=0.6)
    assert every.shape[0] == 5  # a, cat, a, red, hat: the lone ',' has no map of its own to show
    _, empty = call("AttentionEditKSamplerRecord",
                    **inputs("AttentionEditKSamplerRecord", positive=fixtures.encode("sd15", "")))
    with pytest.raises(ValueError, match="has no words to show.*'words'"):
        call("AttentionEditHeatmap", attention_maps=empty, image=image, words="", opacity=0.6)
    with pytest.raises(ValueError, match="prompt \"\" has no words") as error:
        call("AttentionEditMask", **inputs("AttentionEditMask", attention_maps=empty))
    assert "Words of the prompt" not in str(error.value)


def test_magedit_injection_errors_name_the_node_inputs():
    for field, name in (("cross_fraction", "cross_injection"), ("self_fraction", "self_injection")):
        with pytest.raises(ValueError, match=f"'{name}' must be in \\[0, 1\\]"):
            magedit.MagEditConfig(**{field: 1.2}).validate()


@pytest.mark.parametrize("name, value", [("resolution", "16x16"), ("layers", "all"), ("normalisation", "text")])
def test_record_combo_value_not_offered_is_an_error_naming_the_input(name, value):
    with pytest.raises(ValueError, match=f"'{name}' must be one of .*got '{value}'"):
        call("AttentionEditKSamplerRecord", **inputs("AttentionEditKSamplerRecord", **{name: value}))
