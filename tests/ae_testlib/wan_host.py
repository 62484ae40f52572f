"""Tiny random-weight Wan video models (2.1 T2V, 2.1 I2V, 2.1 VACE, 2.2 5B T2V) from ComfyUI's
classes, configured as ComfyUI configures a checkpoint it loads: a checkpoint skeleton (the keys
`comfy.model_detection.detect_unet_config` reads, tiny shapes) run through the host's own
detection, then the widths detection assumes (heads = dim / 128, umT5's 4096 channels) set tiny.
"""
import functools

import pytest
import torch

from . import dit_host, host

VARIANTS = ("wan21", "wan21_i2v", "wan21_vace", "wan22_5b")
CONTEXT_DIM = 32  # umT5 width the tiny models take (real: 4096)
TEXT_LEN = 512  # umT5 context length ComfyUI pads to (min_length=512)
DIM, DEPTH = 64, 3
CLIP_TOKENS, CLIP_DIM = 257, 1280  # CLIP-H penultimate states (2.1 I2V's image cross-attention)
FEATURES = ("wan", "model_wrappers", "attention_override")


def require_wan_host():
    reason = host.missing_reason(FEATURES)
    if reason:
        pytest.skip(reason)


def _skeleton(variant):
    channels = 48 if variant == "wan22_5b" else 16  # 2.2 5B: 48-channel latent in and out
    in_dim = {"wan21_i2v": 36}.get(variant, channels)  # I2V: + 4 mask + 16 image channels
    keys = {"head.modulation": (1, 2, DIM), "head.head.weight": (channels * 4, DIM),
            "patch_embedding.weight": (DIM, in_dim, 1, 2, 2),
            **{f"blocks.{i}.ffn.0.weight": (2 * DIM, DIM) for i in range(DEPTH)}}
    if variant == "wan21_i2v":
        keys["img_emb.proj.0.bias"] = (CLIP_DIM,)
    if variant == "wan21_vace":  # one VACE block (runs after main block 0) on 32 + 64 channels
        keys["vace_patch_embedding.weight"] = (DIM, 96, 1, 2, 2)
        keys["vace_blocks.0.after_proj.weight"] = (DIM, DIM)
    return keys


def detected_config(variant):
    import comfy.model_detection

    skeleton = {key: torch.empty(shape, device="meta") for key, shape in _skeleton(variant).items()}
    config = comfy.model_detection.detect_unet_config(skeleton, "")
    config.update(num_heads=2, text_dim=CONTEXT_DIM)
    return config


def build(variant, seed=0):
    """A ModelPatcher around a random-weight Wan model of `variant` (one of VARIANTS), built by the
    supported_models class ComfyUI picks for the detected config."""
    require_wan_host()
    import comfy.model_detection
    import comfy.model_patcher

    config = detected_config(variant)
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    if model_config is None:
        raise RuntimeError(f"no supported_models class matches the detected {variant} config {config}")
    model = model_config.get_model({})
    dit_host._init(model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@functools.lru_cache(maxsize=None)
def model(variant, seed=0):
    """Cached tiny model; tests patch clones only."""
    return build(variant, seed)


def latent(variant, batch=1, frames=3, height=6, width=10):
    channels = 48 if variant == "wan22_5b" else 16
    return {"samples": torch.zeros(batch, channels, frames, height, width)}


def conditioning(n_real=7, seed=0, tokens=None, clip_image=False, **options):
    """A CONDITIONING like umT5's: [1, 512, CONTEXT_DIM], the rows past the prompt's `n_real`
    tokens zeroed (ComfyUI's zero_out_masked). clip_image: a CLIP-vision output for 2.1 I2V."""
    generator = torch.Generator().manual_seed(seed)
    cond = torch.zeros(1, TEXT_LEN, CONTEXT_DIM)
    cond[:, :n_real] = torch.randn(1, n_real, CONTEXT_DIM, generator=generator)
    extra = dict(options)
    if clip_image:
        extra["clip_vision_output"] = _ClipVisionOutput(torch.randn(1, CLIP_TOKENS, CLIP_DIM, generator=generator))
    if tokens is not None:
        from .pack import pack_module

        extra[pack_module("attention.tokens").ANNOTATION_KEY] = tokens
    return [[cond, extra]]


class _ClipVisionOutput:
    """What CLIPVisionEncode gives, as far as Wan's conds read it (comfy.clip_vision.Output)."""

    def __init__(self, penultimate):
        self.penultimate_hidden_states = penultimate
