"""One small valid call of every node of the pack, as ComfyUI makes it (keyword inputs by their
node names), for the tests that vary one input (test_hardening) or watch global state
(test_global_state). Tiny models, 16x16 latents, 2-4 steps."""
import functools

import torch

from ae_testlib import dit_text, fixtures, registry

RESOLUTION = "1/4 (16x16 at 512 px on SD1.x)"
SOURCE, TARGET = "a photo of a cat on a sofa", "a photo of a cat on a red sofa"


def node(key):
    classes, _ = registry.pack_nodes()
    return classes[key]


def call(key, **inputs):
    """Run node `key` inside inference mode, as ComfyUI's executor does."""
    cls = node(key)
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def latent(batch=1, channels=4, hw=(16, 16), seed=1):
    return {"samples": torch.randn(batch, channels, *hw, generator=torch.Generator().manual_seed(seed))}


def box_mask(size=128):
    mask = torch.zeros(1, size, size)
    mask[:, 32:96, 40:100] = 1.0
    return mask


@functools.lru_cache(maxsize=None)
def recorded_maps(text="a corgi wearing a red hat"):
    _, maps = call("AttentionEditKSamplerRecord", **record_inputs(text))
    return maps


@functools.lru_cache(maxsize=None)
def inversion(steps=3):
    result, _ = call("AttentionEditInversion", **inversion_inputs(steps))
    return result


def ip2p_conds(text="put a *hat* on the dog", src=None):
    """Instruction Text Encode + what InstructPixToPixConditioning adds (the encoded source image)."""
    src = latent(seed=3)["samples"] if src is None else src
    positive, negative = call("AttentionEditInstructionEncode", clip=fixtures.clip("sd15"), text=text)
    add = lambda conds: [[c, {**d, "concat_latent_image": src}] for c, d in conds]  # noqa: E731
    return add(positive), add(negative)


def record_inputs(text="a corgi wearing a red hat", **changes):
    return {"model": fixtures.model("sd15"), "seed": 0, "steps": 2, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "positive": fixtures.encode("sd15", text),
            "negative": fixtures.encode("sd15", ""), "latent_image": latent(), "denoise": 1.0,
            "resolution": RESOLUTION, "layers": "down + up", "branch": "cond", **changes}


def inversion_inputs(steps=3, **changes):
    return {"model": fixtures.model("sd15"), "positive": fixtures.encode("sd15", SOURCE),
            "negative": fixtures.encode("sd15", ""), "latent": latent(), "steps": steps, "null_text": True,
            "inner_iterations": 1, "cfg": 7.5, **changes}


def foi_settings(**changes):
    return {"text_cfg": 7.5, "image_cfg": 1.5, "gamma": 3, "tau": 0.5, "blur_kernel": 3, "blur_sigma": 0.5,
            "modulation": True, "alpha": "1.0", "disentangle_fraction": 0.75, **changes}


def dit_model(family):
    from ae_testlib import dit_host

    return dit_host.model(family)  # skips (the host skip) where ComfyUI has no DiT models


def kontext_conds(text="put a *hat* on the dog"):
    """Instruction Text Encode (T5) + what ReferenceLatent and FluxGuidance add, for Flux Kontext."""
    dit_text.require_dit_clip("flux")
    positive, negative = call("AttentionEditInstructionEncode", clip=dit_text.build_dit_clip("flux"), text=text)
    ref = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(3))
    add = lambda conds: [[c, {**d, "reference_latents": [ref], "guidance": 2.5}] for c, d in conds]  # noqa: E731
    return add(positive), add(negative)


def foi_dit_settings(**changes):
    return {"text_cfg": 0.0, "image_cfg": 1.0, "gamma": 3, "tau": 0.5, "blur_kernel": 3, "blur_sigma": 0.5,
            "mask_upsample": 4, "modulation": True, "alpha": "1.0", "disentangle_fraction": 0.75,
            "mask_blocks": "", **changes}


def inputs(key, **changes):
    """Valid inputs of node `key` with `changes` applied."""
    if key == "AttentionEditTextEncode":
        base = {"clip": fixtures.clip("sd15"), "text": "a corgi wearing a red hat"}
    elif key == "AttentionEditTextEncodeQwenImageEdit":
        dit_text.require_dit_clip("qwen_image")
        base = {"clip": dit_text.build_dit_clip("qwen_image"), "prompt": "put a red hat on the dog"}
    elif key == "AttentionEditTextEncodeQwenImageEditPlus":
        dit_text.require_dit_clip("qwen_image")
        base = {"clip": dit_text.build_dit_clip("qwen_image"), "prompt": "put a red hat on the dog",
                "image1": torch.rand(1, 64, 96, 3), "image2": torch.rand(1, 80, 48, 3)}
    elif key == "AttentionEditInstructionEncode":
        base = {"clip": fixtures.clip("sd15"), "text": "put a *hat* on the dog"}
    elif key == "AttentionEditKSamplerRecord":
        base = record_inputs()
    elif key == "AttentionEditKSamplerAdvancedRecord":
        record = record_inputs()
        base = {**{k: v for k, v in record.items() if k not in ("seed", "denoise")}, "noise_seed": record["seed"],
                "add_noise": "enable", "start_at_step": 0, "end_at_step": 10000,
                "return_with_leftover_noise": "disable"}
    elif key == "AttentionEditHeatmap":
        base = {"attention_maps": recorded_maps(), "image": torch.full((1, 128, 128, 3), 0.5), "words": "",
                "opacity": 0.6}
    elif key == "AttentionEditMask":
        base = {"attention_maps": recorded_maps(), "words": "corgi", "blur": 1.0, "threshold": 0.5,
                "combine": "union"}
    elif key == "AttentionEditInstDiffEdit":
        base = {"model": fixtures.model("sd15"), "positive": fixtures.encode("sd15", "a photo of a red cat"),
                "negative": fixtures.encode("sd15", ""), "source": latent(), "seed": 0, "steps": 4,
                "strength": 0.5, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "copies": 1,
                "theta_hi": 0.9, "theta_lo": 0.6, "phi": 0.2, "background_noise": "official (step's sigma)"}
    elif key == "AttentionEditInstDiffEditMask":
        base = {"attention_maps": recorded_maps(), "theta_hi": 0.9, "theta_lo": 0.6, "phi": 0.2}
    elif key == "AttentionEditFoISampler":
        positive, negative = ip2p_conds()
        base = {"model": fixtures.model("sd15", ip2p=True), "positive": positive, "negative": negative,
                "latent_image": latent(), "seed": 0, "steps": 2, "denoise": 0.8, "sampler_name": "euler",
                "scheduler": "normal", **foi_settings(), "start": "source image"}
    elif key == "AttentionEditFoIGuider":
        positive, negative = ip2p_conds()
        base = {"model": fixtures.model("sd15", ip2p=True), "positive": positive, "negative": negative,
                **foi_settings()}
    elif key == "AttentionEditInversion":
        base = inversion_inputs()
    elif key == "AttentionEditMAGEdit":
        base = {"model": fixtures.model("sd15"), "inversion": inversion(),
                "source_positive": fixtures.encode("sd15", SOURCE),
                "target_positive": fixtures.encode("sd15", TARGET), "negative": fixtures.encode("sd15", ""),
                "mask": box_mask(), "edit_words": "red", "steps": 3, "cfg": 7.5, "optimized_steps": 1,
                "iterations": 1, "scale": 2.5, "loss": "token", "cross_injection": 0.8, "self_injection": 0.5,
                "blend_steps": 1}
    elif key == "AttentionEditInstructionEncodeQwenImageEdit":
        dit_text.require_dit_clip("qwen_image")
        base = {"clip": dit_text.build_dit_clip("qwen_image"), "text": "put a *hat* on the dog"}
    elif key == "AttentionEditInstructionEncodeQwenImageEditPlus":
        dit_text.require_dit_clip("qwen_image")
        base = {"clip": dit_text.build_dit_clip("qwen_image"), "text": "put a *hat* on the dog",
                "image1": torch.rand(1, 64, 96, 3), "image2": torch.rand(1, 80, 48, 3)}
    elif key == "AttentionEditFoIDiTSampler":
        positive, negative = kontext_conds()
        base = {"model": dit_model("flux"), "positive": positive, "negative": negative,
                "latent_image": latent(channels=16, hw=(8, 12)), "seed": 0, "steps": 2, "sampler_name": "euler",
                "scheduler": "simple", "denoise": 1.0, **foi_dit_settings()}
    elif key == "AttentionEditFoIDiTGuider":
        positive, negative = kontext_conds()
        base = {"model": dit_model("flux"), "positive": positive, "negative": negative, **foi_dit_settings()}
    else:
        raise KeyError(f"no test call for node {key}: add one to tests/node_calls.py")
    return {**base, **changes}
