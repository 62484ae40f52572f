"""Tiny random-weight Wan video models (2.1 T2V, 2.1 I2V, 2.1 VACE, 2.2 5B T2V) from ComfyUI's
classes, configured as ComfyUI configures a checkpoint it loads: a checkpoint skeleton (the keys
`comfy.model_detection.detect_unet_config` reads, tiny shapes) run through the host's own
detection, then the widths detection assumes (heads = dim / 128, umT5's 4096 channels) set tiny.
"""
import functools

import pytest
import torch

from . import dit_host, host

VARIANTS = ("wan21", "wan21_i2v", "wan21_vace", "wan21_ref", "wan22_5b")
CONTEXT_DIM = 32  # umT5 width the tiny models take (real: 4096)
TEXT_LEN = 512  # umT5 context length ComfyUI pads to (min_length=512)
DIM, DEPTH = 64, 3
CLIP_TOKENS, CLIP_DIM = 257, 1280  # CLIP-H penultimate states (2.1 I2V's image cross-attention)
FEATURES = ("wan", "model_wrappers", "attention_override")


def require_wan_host():
    reason = host.missing_reason(FEATURES)
    if reason:
        pytest.skip(reason)


FULL_1_3B = (1536, 8960)  # Wan 2.1 T2V 1.3B's dim and ffn_dim (benchmarks: one full-width block)


REAL_DEPTH = 30  # Wan 2.1 1.3B and 2.2 5B blocks (14B: 40)


def _skeleton(variant, size="tiny", depth=None):
    channels = 48 if variant == "wan22_5b" else 16  # 2.2 5B: 48-channel latent in and out
    in_dim = {"wan21_i2v": 36}.get(variant, channels)  # I2V: + 4 mask + 16 image channels
    (dim, ffn), depth = (FULL_1_3B, 1) if size == "full" else ((DIM, 2 * DIM), depth or DEPTH)
    keys = {"head.modulation": (1, 2, dim), "head.head.weight": (channels * 4, dim),
            "patch_embedding.weight": (dim, in_dim, 1, 2, 2),
            **{f"blocks.{i}.ffn.0.weight": (ffn, dim) for i in range(depth)}}
    if variant == "wan21_i2v":
        keys["img_emb.proj.0.bias"] = (CLIP_DIM,)
    if variant == "wan21_ref":  # Fun-Control's reference image (ref_conv): H' x W' tokens before the video
        keys["ref_conv.weight"] = (DIM, channels, 2, 2)
    if variant == "wan21_vace":  # one VACE block (runs after main block 0) on 32 + 64 channels
        keys["vace_patch_embedding.weight"] = (DIM, 96, 1, 2, 2)
        keys["vace_blocks.0.after_proj.weight"] = (DIM, DIM)
    return keys


def detected_config(variant, size="tiny", depth=None):
    """size "full": one full-width Wan 1.3B block (12 heads of 128, umT5's 4096 channels, as
    detection and the model's defaults give them); "tiny": 2 heads, 32 text channels."""
    import comfy.model_detection

    skeleton = {key: torch.empty(shape, device="meta") for key, shape in _skeleton(variant, size, depth).items()}
    config = comfy.model_detection.detect_unet_config(skeleton, "")
    if size != "full":
        config.update(num_heads=2, text_dim=CONTEXT_DIM)
    return config


def build(variant, seed=0, size="tiny", depth=None):
    """A ModelPatcher around a random-weight Wan model of `variant` (one of VARIANTS), built by the
    supported_models class ComfyUI picks for the detected config. depth: blocks (default DEPTH;
    REAL_DEPTH for the released block count, so the default recorded blocks are the real ones)."""
    require_wan_host()
    import comfy.model_detection
    import comfy.model_patcher

    config = detected_config(variant, size, depth)
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    if model_config is None:
        raise RuntimeError(f"no supported_models class matches the detected {variant} config {config}")
    model = model_config.get_model({})
    dit_host._init(model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@functools.lru_cache(maxsize=None)
def model(variant, seed=0, depth=None):
    """Cached tiny model; tests patch clones only."""
    return build(variant, seed, depth=depth)


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


def decoded_shape(variant, latent_frames, height, width):
    """(frames, H, W) that ComfyUI's own Wan VAE class (2.1, or 2.2's for the 5B) decodes a latent
    of this size to: a tiny random-weight VAE, only its shape is read."""
    import comfy.ldm.wan.vae as vae21
    import comfy.ldm.wan.vae2_2 as vae22

    with torch.inference_mode():
        if variant == "wan22_5b":
            vae = vae22.WanVAE(dim=8, dec_dim=8, z_dim=48, num_res_blocks=1).eval()
            out = vae.decode(torch.zeros(1, 48, latent_frames, height, width))
        else:
            vae = vae21.WanVAE(dim=8, z_dim=16, num_res_blocks=1).eval()
            out = vae.decode(torch.zeros(1, 16, latent_frames, height, width))
    return tuple(out.shape[2:])


def plant(model, region, token_columns, beta=8.0, noise=0.0, noise_seed=0, n_real=None):
    """A clone of a Wan ModelPatcher whose text cross-attention calls get `beta` added to the
    logits [video token in region, prompt token in token_columns] of the positive prompt's rows
    (dit_plant's mechanism: an APPLY_MODEL wrapper puts a planting override in front of whatever
    override is there, the method's included). region: [F', H', W'] or [B, F', H', W'] bool on the
    token grid, frame-major like Wan's tokens; it may move from frame to frame.
    noise > 0 adds a fixed random logit (std `noise`, seeded) to every (video token, text key) pair
    of those rows, as real attention varies per token: one value per real key (the first `n_real`),
    one shared by all zeroed padding keys (they are one and the same key vector in a real model)."""
    import comfy.patcher_extension

    from . import dit_plant

    columns = list(token_columns)

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        chunks = transformer_options.get("cond_or_uncond") or [0]
        per_chunk = x.shape[0] // len(chunks)
        grid = region if region.ndim == 4 else region.expand(per_chunk, *region.shape)
        grid = grid.repeat(len(chunks), 1, 1, 1)
        positive = torch.tensor([kind == 0 for kind in chunks for _ in range(per_chunk)])

        def bias_of(q_len, k_len, batch, dtype, device):
            if k_len != c_crossattn.shape[1] or q_len != grid[0].numel() or batch != x.shape[0]:
                return None  # self-attention, I2V's CLIP-image call
            bias = torch.zeros(batch, 1, q_len, k_len, dtype=dtype, device=device)
            values = (grid.reshape(batch, -1).to(dtype) * beta * positive[:, None].to(dtype)).to(device)
            for column in columns:
                bias[:, 0, :, column] = values
            if not noise:
                return bias, None  # (bias, noise): dit_plant's override takes both
            generator = torch.Generator().manual_seed(noise_seed)
            real = k_len if n_real is None else n_real
            pattern = torch.randn(per_chunk, q_len, real + 1, generator=generator) * noise
            pattern = torch.cat([pattern[..., :real], pattern[..., real:].expand(-1, -1, k_len - real)], -1)
            noisy = pattern.repeat(len(chunks), 1, 1).to(dtype) * positive[:, None, None].to(dtype)
            return bias, noisy[:, None].to(device)

        options = dict(transformer_options)
        options["optimized_attention_override"] = dit_plant._PlantingOverride(
            bias_of, transformer_options.get("optimized_attention_override"))
        return executor(x, t, c_concat, c_crossattn, control, options, **kw)

    planted = model.clone()
    planted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, dit_plant.WRAPPER_KEY, wrapper)
    return planted
