"""Tiny random-weight DiT models (Flux, Flux Kontext, Chroma, SD3, Qwen-Image) from ComfyUI's own
classes, and the one skip for hosts without them (the PyPI snapshot predates ComfyUI's DiTs)."""
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


def _configs(size):
    wide = size == "full"
    flux = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768 if wide else POOLED_DIM,
                context_in_dim=4096 if wide else CONTEXT_DIM, hidden_size=3072 if wide else 64,
                mlp_ratio=4.0 if wide else 2.0, num_heads=24 if wide else 2, depth=2, depth_single_blocks=2,
                axes_dim=[16, 56, 56] if wide else [8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
                guidance_embed=True)
    return {
        "flux": flux,
        "chroma": dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=CONTEXT_DIM,
                       hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2,
                       axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=64,
                       hidden_dim=32, n_layers=1),
        "sd3": dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=POOLED_DIM,
                    pos_embed_max_size=32, qk_norm="rms", x_block_self_attn_layers=[0],
                    context_embedder_config={"target": "torch.nn.Linear",
                                             "params": {"in_features": CONTEXT_DIM, "out_features": 128}}),
        "qwen": dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                     attention_head_dim=32, num_attention_heads=2, joint_attention_dim=CONTEXT_DIM,
                     axes_dims_rope=(8, 12, 12)),
    }


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
    host._init_weights(model, seed)


# the released models' block counts (Flux dev 19 + 38, SD3 medium 24, Qwen-Image 60) at tiny width
REAL_DEPTH = {"flux": {"depth": 19, "depth_single_blocks": 38}, "sd3": {"num_blocks": 24},
              "qwen": {"num_layers": 60}}


def _text_widths(family, config, context_dim, pooled_dim):
    """Set the widths of the conditioning the model takes (a real text encoder's, e.g. SD3's 4096)."""
    if context_dim is not None:
        if family == "sd3":
            config["context_embedder_config"] = {
                "target": "torch.nn.Linear", "params": {"in_features": context_dim, "out_features": 128}}
        else:
            config[{"qwen": "joint_attention_dim"}.get(family, "context_in_dim")] = context_dim
    if pooled_dim is not None:
        config[{"sd3": "adm_in_channels"}.get(family, "vec_in_dim")] = pooled_dim
    return config


def build(family, seed=0, size="tiny", real_depth=False, context_dim=None, pooled_dim=None):
    """A ModelPatcher around a random-weight DiT of `family` (one of FAMILIES); `real_depth` gives
    it the released model's block count (REAL_DEPTH) at the same tiny width."""
    require_dit_host()
    import comfy.model_patcher
    import comfy.supported_models as sm

    classes = {"flux": sm.Flux, "chroma": sm.Chroma, "sd3": sm.SD3, "qwen": sm.QwenImage}
    config = dict(_configs(size)[family], **(REAL_DEPTH.get(family, {}) if real_depth else {}))
    model = classes[family](_text_widths(family, config, context_dim, pooled_dim)).get_model({})
    _init(model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@functools.lru_cache(maxsize=None)
def model(family):
    """Cached tiny model; tests patch clones only."""
    return build(family)


def latent(family, batch=1, height=6, width=10):
    return {"samples": torch.zeros(batch, 16, height, width)}


def conditioning(n_tokens=7, seed=0, batch=1, tokens=None, **options):
    """A CONDITIONING of random text embeddings (width CONTEXT_DIM) with a pooled vector."""
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, n_tokens, CONTEXT_DIM, generator=generator)
    extra = {"pooled_output": torch.randn(batch, POOLED_DIM, generator=generator), **options}
    if tokens is not None:
        from .pack import pack_module

        extra[pack_module("attention.tokens").ANNOTATION_KEY] = tokens
    return [[cond, extra]]
