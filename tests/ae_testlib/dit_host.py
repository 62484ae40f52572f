"""Tiny random-weight DiT models (Flux, Flux Kontext, Chroma, SD3, Qwen-Image, Z-Image) from ComfyUI's own
classes, configured the way ComfyUI configures a checkpoint it loads.

Each family is described by a *checkpoint skeleton*: the keys (with tiny shapes) by which
`comfy.model_detection.detect_unet_config` recognises that family's checkpoints. The host's own
detection turns it into a config, so every field a newer ComfyUI adds to its parameter
dataclasses (0.19.3's `FluxParams.txt_ids_dims`, `ChromaParams.vec_in_dim`, ...) is filled as it
fills it for a real checkpoint; only the widths detection cannot see are then set tiny. Checkpoint
formats do not change between ComfyUI versions, parameter lists do.
"""
import functools

import pytest
import torch

from . import host

FAMILIES = ("flux", "chroma", "sd3", "qwen")
CONTEXT_DIM = 32  # text-encoder width the tiny models take
POOLED_DIM = 32


DIT_FEATURES = ("flux", "chroma", "sd3", "qwen_image", "model_wrappers")


def require_dit_host():
    """Skip (the suite's one host skip, with its reason) on a host without ComfyUI's DiT models."""
    reason = host.missing_reason(DIT_FEATURES)
    if reason:
        pytest.skip(reason)


def _blocks(pattern, count, shape):
    return {pattern.format(i): shape for i in range(count)}


def _skeleton(family, size):
    """{key: shape} of a checkpoint of `family`: the keys detection reads, at the model's widths."""
    if size == "real":
        return _real_skeleton(family)
    full = size == "full"
    if family == "flux":  # Flux.1 [dev] (guidance embedding; Kontext is the same checkpoint format)
        hidden, context, pooled = (3072, 4096, 768) if full else (64, CONTEXT_DIM, POOLED_DIM)
        return {"img_in.weight": (hidden, 16 * 4), "txt_in.weight": (hidden, context),
                "vector_in.in_layer.weight": (hidden, pooled), "guidance_in.in_layer.weight": (hidden, 256),
                **_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", 2, (hidden // 24,)),
                **_blocks("single_blocks.{}.norm.key_norm.scale", 2, (hidden // 24,))}
    if family == "chroma":  # no vector_in, no guidance_in: a distilled guidance layer instead
        return {"img_in.weight": (64, 64), "txt_in.weight": (64, CONTEXT_DIM),
                "distilled_guidance_layer.norms.0.scale": (32,),
                **_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", 2, (32,)),
                **_blocks("single_blocks.{}.norm.key_norm.scale", 2, (32,))}
    if family == "sd3":  # SD3.5-style: RMS q/k norm, one x-block self-attention layer
        depth, hidden = 2, 128  # detection reads depth as x_embedder's width / 64
        return {"x_embedder.proj.weight": (hidden, 16, 2, 2), "final_layer.linear.weight": (16 * 4, hidden),
                "y_embedder.mlp.0.weight": (hidden, POOLED_DIM), "context_embedder.weight": (hidden, CONTEXT_DIM),
                "pos_embed": (1, 32 * 32, hidden), "joint_blocks.0.context_block.attn.ln_q.weight": (64,),
                "joint_blocks.0.x_block.attn2.qkv.weight": (3 * hidden, hidden),
                **_blocks("joint_blocks.{}.context_block.attn.qkv.weight", depth, (3 * hidden, hidden))}
    if family == "zimage":  # detection reads Z-Image from the 3840 width; tiny widths are set after matching
        return _zimage_skeleton(2, 2560 if full else CONTEXT_DIM)
    if family == "qwen":  # full: the model class's defaults are Qwen-Image's widths
        hidden, context = (3072, 3584) if full else (64, CONTEXT_DIM)
        return {"txt_norm.weight": (context,), "img_in.weight": (hidden, 64),
                **_blocks("transformer_blocks.{}.img_mod.1.weight", 2, (6 * hidden, hidden))}
    if family == "hunyuan_image":
        return _hunyuan_image_skeleton(*((3584, 3584, 20, 40) if full else (64, CONTEXT_DIM, 2, 2)))
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _hunyuan_image_skeleton(hidden, context, double, single):
    """HunyuanImage 2.1: HunyuanVideo's checkpoint format (the token refiner's keys) with a 2-D
    patch of 1 on the 64-channel latent, no vector_in, and the byT5 glyph mapper."""
    return {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (hidden,),
            "txt_in.input_embedder.weight": (hidden, context), "img_in.proj.weight": (hidden, 64, 1, 1),
            "final_layer.linear.weight": (64, hidden), "byt5_in.fc1.weight": (2048, 1472),
            **_blocks("double_blocks.{}.img_attn.norm.key_norm.weight", double, (hidden // 28,)),
            **_blocks("single_blocks.{}.norm.key_norm.weight", single, (hidden // 28,))}


def _real_skeleton(family):
    """The real checkpoints' keys and shapes that detection reads: Flux.1 [dev] (19 double + 38
    single blocks; Kontext's network too), Chroma, SD3.5 Large (38 joint blocks), Qwen-Image (60
    blocks). For tests/device/run.py on a GPU; the suite checks their parameter counts on the meta
    device."""
    flux_blocks = {**_blocks("double_blocks.{}.img_attn.norm.key_norm.scale", 19, (128,)),
                   **_blocks("single_blocks.{}.norm.key_norm.scale", 38, (128,))}
    if family == "flux":
        return {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
                "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256), **flux_blocks}
    if family == "chroma":
        return {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
                "distilled_guidance_layer.norms.0.scale": (5120,), **flux_blocks}
    if family == "sd3":
        hidden = 38 * 64
        return {"x_embedder.proj.weight": (hidden, 16, 2, 2), "final_layer.linear.weight": (16 * 4, hidden),
                "y_embedder.mlp.0.weight": (hidden, 2048), "context_embedder.weight": (hidden, 4096),
                "pos_embed": (1, 192 * 192, hidden), "joint_blocks.0.context_block.attn.ln_q.weight": (64,),
                **_blocks("joint_blocks.{}.context_block.attn.qkv.weight", 38, (3 * hidden, hidden))}
    if family == "qwen":
        return {"txt_norm.weight": (3584,), "img_in.weight": (3072, 64),
                **_blocks("transformer_blocks.{}.img_mod.1.weight", 60, (6 * 3072, 3072))}
    if family == "zimage":
        return _zimage_skeleton(30, 2560)
    if family == "hunyuan_image":  # HunyuanImage 2.1: 20 double + 40 single blocks, 28 heads
        return _hunyuan_image_skeleton(3584, 3584, 20, 40)
    raise ValueError(f"no real {family!r} model here; one of {FAMILIES}")


def _zimage_skeleton(layers, caption_width):
    """Z-Image (Turbo): 3840 wide (what detection reads it by), Qwen3-4B's 2560-wide captions, the
    caption / image pad tokens (pad_tokens_multiple 32), `layers` main layers."""
    return {"cap_embedder.1.weight": (3840, caption_width), "noise_refiner.0.attention.k_norm.weight": (128,),
            "cap_pad_token": (1, 3840), "x_pad_token": (1, 3840),
            **_blocks("layers.{}.ffn_norm1.weight", layers, (3840,))}


# What detection cannot read from the skeleton's few keys (it assumes the full model's head count
# and RoPE axes): the tiny widths, consistent with the skeleton's.
_TINY = {
    "flux": dict(hidden_size=64, num_heads=2, axes_dim=[8, 12, 12], mlp_ratio=2.0,
                 context_in_dim=CONTEXT_DIM, vec_in_dim=POOLED_DIM),
    "chroma": dict(hidden_size=64, num_heads=2, axes_dim=[8, 12, 12], mlp_ratio=2.0, context_in_dim=CONTEXT_DIM,
                   out_dim=64, hidden_dim=32, n_layers=1),
    "sd3": {},
    "qwen": dict(attention_head_dim=32, num_attention_heads=2, joint_attention_dim=CONTEXT_DIM,
                 axes_dims_rope=(8, 12, 12)),
    "zimage": {},  # _TINY_AFTER_MATCH: ComfyUI picks supported_models.ZImage by its 3840 width
    "hunyuan_image": dict(hidden_size=64, num_heads=2, axes_dim=[16, 16], mlp_ratio=2.0, context_in_dim=CONTEXT_DIM),
}
# Widths set once the supported_models class is picked (its unet_config matches on them). Z-Image's
# timestep embedding is 256 wide whatever the model's width, and its blocks read min(dim, 256) of it:
# 256 is the smallest width that runs.
_TINY_AFTER_MATCH = {"zimage": dict(dim=256, n_heads=4, n_kv_heads=4, axes_dims=[16, 24, 24])}


# Checkpoint variants of a family's skeleton: keys added (a shape) or left out (None), and the
# tiny widths that change with them.
VARIANTS = {
    # Flux.2 (ComfyUI >= 0.3.72): global modulation, patch size 1 on a 128-channel latent
    ("flux", "flux2"): ({"vector_in.in_layer.weight": None, "img_in.weight": (64, 128),
                         "double_stream_modulation_img.lin.weight": (6 * 64, 64)},
                        {"vec_in_dim": None, "axes_dim": [8, 8, 8, 8]}),
    # Flux.2 [klein] (ComfyUI >= 0.9.2): Flux.2 without the guidance embedding (step-distilled)
    ("flux", "klein"): ({"vector_in.in_layer.weight": None, "guidance_in.in_layer.weight": None,
                         "img_in.weight": (64, 128), "double_stream_modulation_img.lin.weight": (6 * 64, 64)},
                        {"vec_in_dim": None, "axes_dim": [8, 8, 8, 8]}),
    # Qwen-Image-Edit-2511: the marker key by which ComfyUI (>= 0.5) sets
    # default_ref_method="index_timestep_zero" (reference tokens at timestep 0, a 2B-batch temb)
    ("qwen", "edit_2511"): ({"__index_timestep_zero__": (0,)}, {}),
    # HunyuanImage 2.1's refiner: the same class with a 3-D patch [1, 1, 1] on a frame axis
    ("hunyuan_image", "refiner"): ({"img_in.proj.weight": (64, 64, 1, 1, 1), "byt5_in.fc1.weight": None},
                                   {"axes_dim": [8, 12, 12]}),
}


def detected_config(family, size="tiny", variant=None):
    """The host's own detection of the family's checkpoint skeleton (optionally a VARIANTS entry),
    with the tiny widths set."""
    import comfy.model_detection

    keys, widths = VARIANTS[(family, variant)] if variant else ({}, {})
    shapes = dict(_skeleton(family, size))
    for key, shape in keys.items():
        if shape is None:
            shapes.pop(key)
        else:
            shapes[key] = shape
    skeleton = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = comfy.model_detection.detect_unet_config(skeleton, "")
    if config is None:
        raise RuntimeError(f"this ComfyUI does not detect the {family} checkpoint skeleton")
    if size == "tiny":
        config.update(_TINY[family])
        config.update(widths)
    return config


def _init(model, seed):
    """ComfyUI allocates weights uninitialised: norm scales 1, everything else PyTorch's default
    init (host._init_weights), small normal values where no module default applies."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or leaf == "scale":
                param.fill_(1.0)
            else:
                param.fill_(float("nan"))
        # checkpoint tensors ComfyUI keeps as buffers (SD3's pos_embed, torch.empty until a state
        # dict loads): left alone they hold whatever memory held, NaN at times, so a test's
        # result would depend on what ran before it
        generator = torch.Generator().manual_seed(seed + 1)
        for name, buffer in model.diffusion_model.named_buffers():
            if name.rsplit(".", 1)[-1] == "pos_embed" and buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.02)
    host._init_weights(model, seed)


# the released models' block counts (Flux dev 19 + 38, SD3 medium 24, Qwen-Image 60) at tiny width
REAL_DEPTH = {"flux": {"depth": 19, "depth_single_blocks": 38}, "sd3": {"num_blocks": 24},
              "qwen": {"num_layers": 60}, "zimage": {"n_layers": 30},
              "hunyuan_image": {"depth": 20, "depth_single_blocks": 40},
              # Flux.2 [dev] 8 + 48 blocks; [klein] 4B 5 + 20 (9B: 8 + 24)
              ("flux", "flux2"): {"depth": 8, "depth_single_blocks": 48},
              ("flux", "klein"): {"depth": 5, "depth_single_blocks": 20}}


def _text_widths(family, detected, config, context_dim, pooled_dim):
    """Set the widths of the conditioning the model takes (a real text encoder's, e.g. SD3's 4096)."""
    if context_dim is not None:
        if family == "sd3":  # the model's width stays what detection read
            width = detected["context_embedder_config"]["params"]["out_features"]
            config["context_embedder_config"] = {"target": "torch.nn.Linear",
                                                 "params": {"in_features": context_dim, "out_features": width}}
        else:
            config[{"qwen": "joint_attention_dim", "zimage": "cap_feat_dim"}.get(family, "context_in_dim")] = context_dim
    if pooled_dim is not None:
        config[{"sd3": "adm_in_channels"}.get(family, "vec_in_dim")] = pooled_dim
    return config


def supported_config(family, size="tiny", variant=None, overrides=None):
    """The supported_models config ComfyUI picks for the family's detected config (with
    `overrides` set after detection: block counts, text widths)."""
    import comfy.model_detection

    config = {**detected_config(family, size, variant), **(overrides or {})}
    found = comfy.model_detection.model_config_from_unet_config(config)
    if found is None:
        raise RuntimeError(f"no supported_models class matches the detected {family} config {config}")
    if size == "tiny":
        found.unet_config.update(_TINY_AFTER_MATCH.get(family, {}))
    return found


def build(family, seed=0, size="tiny", on_device=False, dtype=None, variant=None, real_depth=False,
          context_dim=None, pooled_dim=None, depth=None):
    """A ModelPatcher around a random-weight DiT of `family` (one of FAMILIES; `variant` a
    VARIANTS entry), built by the supported_models class ComfyUI picks for the detected config.
    size "tiny" (tests), "full" (full width, 2 + 2 blocks: benchmarks) or "real" (the real
    model); `real_depth` gives a tiny model the released model's block count (REAL_DEPTH),
    `context_dim` / `pooled_dim` a real text encoder's widths, `depth` other block counts (config
    keys, e.g. Z-Image's {"n_layers": 1, "n_refiner_layers": 1}). On the CPU in float32 (or
    `dtype`, computed in it), unless on_device: built as ComfyUI loads it on its device
    (host.on_comfy_device)."""
    require_dit_host()
    import comfy.model_patcher

    overrides = _text_widths(family, detected_config(family, size, variant),
                             dict(REAL_DEPTH.get((family, variant), REAL_DEPTH.get(family, {})) if real_depth else {},
                                  **(depth or {})),
                             context_dim, pooled_dim)
    model_config = supported_config(family, size, variant, overrides)
    if on_device:
        return host.on_comfy_device(model_config, lambda model: _init(model, seed), dtype)
    if dtype is not None:  # e.g. the device run's fp16 / bf16 NaN checks
        model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    _init(model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@functools.lru_cache(maxsize=None)
def model(family, variant=None):
    """Cached tiny model; tests patch clones only."""
    return build(family, variant=variant)


LATENT_CHANNELS = {"hunyuan_image": 64}  # the others' VAEs: 16


def latent(family, batch=1, height=6, width=10):
    return {"samples": torch.zeros(batch, LATENT_CHANNELS.get(family, 16), height, width)}


def conditioning(n_tokens=7, seed=0, batch=1, tokens=None, **options):
    """A CONDITIONING of random text embeddings (width CONTEXT_DIM) with a pooled vector."""
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, n_tokens, CONTEXT_DIM, generator=generator)
    extra = {"pooled_output": torch.randn(batch, POOLED_DIM, generator=generator), **options}
    if tokens is not None:
        from .pack import pack_module

        extra[pack_module("attention.tokens").ANNOTATION_KEY] = tokens
    return [[cond, extra]]
