"""FoI on the real ComfyUI host: instruction parsing, masks, modulation, disentangle sampling, nodes.

Tiny random-weight InstructPix2Pix UNets (SD1.5 and SDXL classes) on CPU. IP2P conds are built
without a VAE: `concat_latent_image` (the source latent) goes into copies of the positive and
negative cond dicts, exactly what InstructPixToPixConditioning does after encoding the pixels.
"""
import logging

import pytest
import torch

from ae_testlib import fixtures
from ae_testlib.pack import pack_module

instructions = pack_module("attention.instructions")
tokens_mod = pack_module("attention.tokens")
foi_patch = pack_module("attention.foi_patch")
foi_modulation = pack_module("attention.foi_modulation")
recorder_mod = pack_module("attention.recorder")
masks_foi = pack_module("masks.foi")

TWO = "put a *hat* on the dog; make the *sky* a sunset"
THREE = "put a *hat* on the dog\nmake the *sky* a sunset; turn the *grass* into sand"


@pytest.fixture(scope="module")
def foi(comfy_host):
    return pack_module("samplers.foi")


@pytest.fixture(scope="module")
def nodes(comfy_host):
    return pack_module("nodes.foi")


def source_latent(batch=1, hw=(16, 16), seed=1):
    return torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(seed))


def ip2p_conds(family, text, src):
    """Instruction Text Encode + what InstructPixToPixConditioning does with the encoded image."""
    nodes = pack_module("nodes.foi")
    with torch.inference_mode():
        positive, negative = nodes.InstructionTextEncode().run(fixtures.clip(family), text)
    add = lambda conds: [[c, {**d, "concat_latent_image": src}] for c, d in conds]  # noqa: E731
    return add(positive), add(negative)


class UNetProbe:
    """model_function_wrapper that records every UNet call: chunk layout, per-chunk outputs."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options on some hosts
        return self

    def __call__(self, apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        layout = list(args["cond_or_uncond"])
        self.calls.append({"layout": layout, "x": args["input"].clone(), "sigma": float(args["timestep"].max()),
                           "out": dict(zip(layout, [o.clone() for o in out.chunk(len(layout))]))})
        return out


def probed(model):
    probe = UNetProbe()
    clone = model.clone()
    clone.set_model_unet_function_wrapper(probe)
    return clone, probe


def run(foi, model, positive, negative, batch=1, hw=(16, 16), steps=4, sampler="euler", seed=0, start="source image",
        **config):
    latent = {"samples": torch.zeros(batch, 4, *hw)}
    with torch.inference_mode():
        return foi.sample_foi(model, positive, negative, latent, seed, steps, 0.8, sampler, "normal",
                              foi.FoIConfig(**config), start=start)


# --------------------------------------------------------------------------------------------
# Instruction syntax and encoding
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_parse_spans_and_keywords(family, comfy_host):
    clip = fixtures.clip(family)
    parsed = instructions.parse_instructions(clip, "put a *red hat*, on the (dog:1.2)\n\nmake the *sky* a sunset;")
    strings = parsed.tokens.token_strings
    assert parsed.text == "put a red hat, on the (dog:1.2)\n\nmake the sky a sunset;"
    assert parsed.keywords == ["red hat", "sky"]
    first, second = parsed.subinstructions
    assert [strings[p] for p in first.span] == ["put</w>", "a</w>", "red</w>", "hat</w>", ",</w>", "on</w>",
                                                "the</w>", "dog</w>"]
    assert [strings[p] for p in first.keyword_positions] == ["red</w>", "hat</w>"]  # not the comma
    assert [strings[p] for p in second.keyword_positions] == ["sky</w>"]
    assert first.span[0] == 1 and second.span[-1] == 13  # start token and ';' outside every span
    assert strings[14] == ";</w>" and 14 not in second.span
    assert parsed.tokens.words[6].weight == pytest.approx(1.2)


def test_separator_in_word_and_marker_inside_word(comfy_host):
    parsed = instructions.parse_instructions(fixtures.clip("sd15"), "a *hat*s on it;make *it* red")
    strings = parsed.tokens.token_strings
    assert [strings[p] for p in parsed.subinstructions[0].span] == ["a</w>", "hats</w>", "on</w>", "it</w>"]
    assert [strings[p] for p in parsed.subinstructions[1].span] == ["make</w>", "it</w>", "red</w>"]
    # 'hats' is one token: the keyword takes the whole word
    assert [strings[p] for p in parsed.subinstructions[0].keyword_positions] == ["hats</w>"]


@pytest.mark.parametrize("text, message", [
    ("put a hat on the dog", "has no keyword"),
    ("put a *hat* on the dog; make the sky a sunset", "sub-instruction 2 .* has no keyword"),
    ("put a *hat on the dog; make the* sky a sunset", "keyword must lie inside its sub-instruction"),
    ("put a *hat* on the *dog*", "exactly one keyword"),
    ("put a ** on it", "empty keyword"),
    (" ;\n ", "empty"),
])
def test_syntax_errors(nodes, text, message):
    with pytest.raises(instructions.InstructionSyntaxError, match=message):
        with torch.inference_mode():
            nodes.InstructionTextEncode().run(fixtures.clip("sd15"), text)


def test_more_than_one_chunk_is_an_error(nodes):
    text = "make the *sky* " + " ".join(f"word{i}" for i in range(40))
    with pytest.raises(tokens_mod.PromptLengthError, match="one 77-token chunk"):
        with torch.inference_mode():
            nodes.InstructionTextEncode().run(fixtures.clip("sd15"), text)


def test_encode_node_annotates_and_gives_null_instruction(nodes):
    with torch.inference_mode():
        positive, negative = nodes.InstructionTextEncode().run(fixtures.clip("sd15"), TWO)
    parsed = instructions.instructions_of(positive)
    assert parsed.keywords == ["hat", "sky"] and len(parsed) == 2
    assert tokens_mod.tokens_of(positive).positions("sunset") == [12]  # word nodes work too
    assert positive[0][0].shape == negative[0][0].shape == (1, 77, 32)
    assert instructions.INSTRUCTIONS_KEY not in negative[0][1]
    with pytest.raises(ValueError, match="Instruction Text Encode"):
        instructions.instructions_of(negative, "positive")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, text, batch, hw", [
    ("sd15", "make the *sky* a sunset", 1, (16, 16)),
    ("sd15", THREE, 2, (12, 20)),
    ("sdxl", TWO, 1, (16, 16)),
])
def test_runs_single_multi_batch_sd15_sdxl(foi, family, text, batch, hw):
    src = source_latent(batch, hw)
    positive, negative = ip2p_conds(family, text, src)
    model, probe = probed(fixtures.model(family, True))
    out, guider = run(foi, model, positive, negative, batch=batch, hw=hw, sampler="euler_ancestral")
    k = len(instructions.instructions_of(positive))
    assert out["samples"].shape == (batch, 4, *hw) and torch.isfinite(out["samples"]).all()
    assert guider.masks.shape == (batch, k, -(-hw[0] // 4), -(-hw[1] // 4))
    # one UNet call per step, all three branches in it
    assert len(probe.calls) == 4
    assert all(sorted(call["layout"]) == [0, 1, 2] for call in probe.calls)
    assert guider.state.stats["modulated"] > 0 and guider.state.stats["skipped_split"] == 0


def test_masks_come_from_instruction_branch_of_first_step(foi):
    src = source_latent()
    positive, negative = ip2p_conds("sd15", TWO, src)
    parsed = instructions.instructions_of(positive)
    model = fixtures.model("sd15", True).clone()
    sigmas = pack_module("samplers.common").schedule(model, 4, "euler", "normal", 0.8)
    recorders = {}
    for name, branch, steps in [("step0_cond", "cond", {0}), ("step1_cond", "cond", {1}),
                                ("step0_null", "uncond", {0})]:
        rec = recorder_mod.AttentionRecorder(level=2, branch=branch, steps=steps)
        rec.install(model, (16, 16), sigmas)
        recorders[name] = rec
    # "uncond" in the recorder means cond index 1: FoI's null-instruction (image only) branch
    _, guider = run(foi, model, positive, negative, modulation=False)

    def soft(rec):
        mean = rec.mean()  # [B, h, w, N]
        maps = torch.stack([mean[..., list(p)].mean(-1) for p in parsed.keyword_positions], dim=1)
        return masks_foi.keyword_masks(maps, tau=0.5, gamma=3)

    expected_masks, expected_soft = soft(recorders["step0_cond"])
    assert torch.allclose(guider.soft_maps, expected_soft, atol=1e-5)
    assert torch.equal(guider.masks, expected_masks)
    assert not torch.allclose(guider.soft_maps, soft(recorders["step1_cond"])[1], atol=1e-3)
    assert not torch.allclose(guider.soft_maps, soft(recorders["step0_null"])[1], atol=1e-3)


def test_modulation_changes_only_the_instruction_branch(foi):
    src = source_latent()
    positive, negative = ip2p_conds("sd15", TWO, src)
    model_on, probe_on = probed(fixtures.model("sd15", True))
    model_off, probe_off = probed(fixtures.model("sd15", True))
    run(foi, model_on, positive, negative, modulation=True, alphas=[1.0, 0.5])
    run(foi, model_off, positive, negative, modulation=False)
    first_on, first_off = probe_on.calls[0], probe_off.calls[0]
    for index in (0, 1, 2):  # step 0: masks do not exist yet, no modulation
        assert torch.equal(first_on["out"][index], first_off["out"][index])
    second_on, second_off = probe_on.calls[1], probe_off.calls[1]
    assert torch.equal(second_on["x"], second_off["x"])
    assert torch.equal(second_on["out"][1], second_off["out"][1])  # null instruction
    assert torch.equal(second_on["out"][2], second_off["out"][2])  # neither
    assert not torch.allclose(second_on["out"][0], second_off["out"][0], atol=1e-6)  # instruction


def test_split_batches_are_modulated_like_one_call(foi, monkeypatch):
    import comfy.model_management

    src = source_latent()
    positive, negative = ip2p_conds("sd15", TWO, src)
    whole, probe_whole = probed(fixtures.model("sd15", True))
    out_whole, _ = run(foi, whole, positive, negative)
    def no_free_memory(dev=None, torch_free_too=False):  # ComfyUI then runs one chunk per UNet call
        return (0, 0) if torch_free_too else 0

    monkeypatch.setattr(comfy.model_management, "get_free_memory", no_free_memory)
    split, probe_split = probed(fixtures.model("sd15", True))
    out_split, guider = run(foi, split, positive, negative)
    assert all(len(call["layout"]) == 1 for call in probe_split.calls) and len(probe_split.calls) == 12
    assert guider.state.stats["from_cache"] > 0 and guider.state.stats["skipped_split"] == 0
    assert torch.allclose(out_split["samples"], out_whole["samples"], rtol=1e-4, atol=1e-3)


def _patch_inputs(batch=2, heads=2, dim=4, hw=(4, 4), tokens=77):
    g = torch.Generator().manual_seed(3)
    n = hw[0] * hw[1]
    q = torch.randn(3 * batch, n, heads * dim, generator=g)
    k = torch.randn(3 * batch, tokens, heads * dim, generator=g)
    v = torch.randn(3 * batch, tokens, heads * dim, generator=g)
    return q, k, v


def _edit_state(parsed, latent_hw=(16, 16), batch=2):
    state = foi_patch.FoIState()
    state.instructions = parsed
    state.begin(latent_hw)
    state.phase = "edit"
    masks = torch.zeros(batch, len(parsed), 4, 4)
    masks[:, 0, :2, :2] = 1
    masks[:, 1, 2:, :] = 1
    state.masks = masks
    state.next_call(True, 0.02)
    return state


def test_patch_rows_inner_patch_and_missing_null_branch(comfy_host, caplog):
    from comfy.ldm.modules.attention import optimized_attention

    parsed = instructions.parse_instructions(fixtures.clip("sd15"), TWO)
    state = _edit_state(parsed)
    layer = pack_module("attention.layers").AttentionLayer("input", 7, 0, 2)
    q, k, v = _patch_inputs()
    options = {"cond_or_uncond": [2, 0, 1], "n_heads": 2}
    inner = lambda q, k, v, eo: optimized_attention(q, k, v, eo["n_heads"]) + 1.0  # noqa: E731
    out = foi_patch.FoIAttention(state, layer, inner)(q, k, v, options)
    plain = optimized_attention(q, k, v, 2)
    region = masks_foi.token_region_mask(state.masks, parsed.spans, 77, (4, 4))
    expected0 = foi_modulation.modulated_attention(q[2:4], k[2:4], v[2:4], q[4:6], k[4:6], region, None, 0.02, 2)
    assert torch.allclose(out[0:2], plain[0:2] + 1, atol=1e-5)  # neither: inner output
    assert torch.allclose(out[4:6], plain[4:6] + 1, atol=1e-5)  # null instruction: inner output
    assert torch.allclose(out[2:4], expected0 + 1, atol=1e-5)  # instruction: modulated + inner's extra
    out = foi_patch.FoIAttention(state, layer)(q, k, v, options)  # no inner patch
    assert torch.allclose(out[0:2], plain[0:2], atol=1e-5) and torch.allclose(out[4:6], plain[4:6], atol=1e-5)
    assert torch.allclose(out[2:4], expected0, atol=1e-5)

    alone = {"cond_or_uncond": [0], "n_heads": 2}
    with caplog.at_level(logging.WARNING, logger="attention_edit"):
        out = foi_patch.FoIAttention(state, layer)(q[:2], k[:2], v[:2], alone)
    assert torch.allclose(out, optimized_attention(q[:2], k[:2], v[:2], 2), atol=1e-6)
    assert state.stats["skipped_split"] == 1 and "modulation was skipped" in caplog.text


def test_disentangle_schedule_and_cfg_hooks(foi):
    src = source_latent()
    positive, negative = ip2p_conds("sd15", TWO, src)
    model, probe = probed(fixtures.model("sd15", True))
    seen = {"pre": [], "post": []}

    def pre(args):
        seen["pre"].append(len(args["conds_out"]))
        return args["conds_out"]

    def post(args):
        seen["post"].append({k: args[k] for k in ("denoised", "cond_denoised", "uncond_denoised",
                                                   "empty_cond_denoised", "cond_scale")})
        return args["denoised"]

    model.model_options["sampler_pre_cfg_function"] = [pre]
    model.set_model_sampler_post_cfg_function(post)
    before = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in model.model_options.items()}
    before_to = dict(model.model_options.get("transformer_options", {}))
    _, guider = run(foi, model, positive, negative, steps=8, s_T=5.0, s_I=1.3)

    assert seen["pre"] == [3] * 8 and len(seen["post"]) == 8
    union = masks_foi.union_mask(guider.masks, (16, 16))
    for step, args in enumerate(seen["post"]):
        full, image, none = args["cond_denoised"], args["uncond_denoised"], args["empty_cond_denoised"]
        masked = 1 <= step < 6  # step 0 extracts the masks; 75 % of 8 steps = 6
        expected = masks_foi.disentangled_guidance(full, image, none, 5.0, 1.3, union if masked else None)
        assert torch.allclose(args["denoised"], expected, atol=1e-5), step
        assert args["cond_scale"] == 5.0
    # the branches the guidance combined are the UNet's per-branch outputs (denoised space)
    assert len(probe.calls) == 8
    for call, args in zip(probe.calls, seen["post"]):
        assert torch.equal(call["out"][0], args["cond_denoised"])
        assert torch.equal(call["out"][1], args["uncond_denoised"])
        assert torch.equal(call["out"][2], args["empty_cond_denoised"])
    # the caller's model options are unchanged: no FoI patches leaked into them
    assert model.model_options.keys() == before.keys()
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert model.model_options.get("transformer_options", {}).keys() == before_to.keys()
    assert model.model_options["sampler_pre_cfg_function"] == [pre]


def test_sampler_cfg_function_replaces_text_term(foi):
    src = source_latent()
    positive, negative = ip2p_conds("sd15", TWO, src)
    plain_out, _ = run(foi, fixtures.model("sd15", True), positive, negative)
    calls = []

    def cfg(args):
        calls.append(1)
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    model = fixtures.model("sd15", True).clone()
    model.set_model_sampler_cfg_function(cfg)
    hooked_out, _ = run(foi, model, positive, negative)
    assert len(calls) == 4
    assert torch.allclose(hooked_out["samples"], plain_out["samples"], atol=1e-4)


def test_non_ip2p_model_is_a_clear_error(nodes):
    positive, negative = ip2p_conds("sd15", TWO, source_latent())
    with pytest.raises(ValueError, match="load an InstructPix2Pix checkpoint|Load an InstructPix2Pix checkpoint"):
        with torch.inference_mode():
            nodes.FoISampler().run(fixtures.model("sd15", False), positive, negative,
                                   {"samples": torch.zeros(1, 4, 16, 16)}, 0, 2, 0.8, "euler", "normal",
                                   7.5, 1.5, 3, 0.5, 3, 0.5, True, "1.0", 0.75, "source image")


def test_plain_conditioning_and_alpha_count_errors(foi, comfy_host):
    src = source_latent()
    positive, negative = ip2p_conds("sd15", TWO, src)
    model = fixtures.model("sd15", True)
    plain = [[negative[0][0], dict(negative[0][1])]]
    with pytest.raises(ValueError, match="Instruction Text Encode"):
        foi.foi_guider(model, plain, negative)
    with pytest.raises(ValueError, match="alpha has 3 values but the instruction has 2"):
        foi.foi_guider(model, positive, negative, foi.FoIConfig(alphas=[1.0, 0.5, 0.2]))
    no_image = [[positive[0][0], {k: v for k, v in positive[0][1].items() if k != "concat_latent_image"}]]
    with pytest.raises(ValueError, match="InstructPixToPixConditioning"):
        foi.foi_guider(model, no_image, negative)
    with pytest.raises(ValueError, match="comma"):
        foi.parse_alphas("1.0, strong")


def test_sampler_node_outputs_and_guider_node(nodes, foi):
    src = source_latent(2)
    positive, negative = ip2p_conds("sd15", TWO, src)
    model = fixtures.model("sd15", True)
    options_before = model.model_options
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    with torch.inference_mode():
        out, masks, preview = nodes.FoISampler().run(model, positive, negative, latent, 5, 3, 0.8,
                                                     "euler_ancestral", "normal", 7.5, 1.5, 3, 0.5, 3, 0.5,
                                                     True, "1.0, 0.5", 0.75, "source image")
    assert out["samples"].shape == (2, 4, 16, 16)
    assert masks.shape == (4, 128, 128) and set(masks.unique().tolist()) <= {0.0, 1.0}  # b * K + k
    assert preview.shape == (2, 128, 256, 3)
    assert model.model_options is options_before and "patches_replace" not in model.model_options.get(
        "transformer_options", {})

    import comfy.samplers

    with torch.inference_mode():
        (guider,) = nodes.FoIGuiderNode().run(model, positive, negative, 7.5, 1.5, 3, 0.5, 3, 0.5, True,
                                              "1.0", 0.75)
        assert isinstance(guider, comfy.samplers.CFGGuider)
        sigmas = pack_module("samplers.common").schedule(guider.model_patcher, 3, "euler", "normal", 0.8)
        samples = guider.sample(torch.randn(2, 4, 16, 16), src,
                                comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    assert samples.shape == (2, 4, 16, 16) and guider.masks.shape == (2, 2, 4, 4)
