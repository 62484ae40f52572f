"""Tiny random-weight text encoders of the DiT families, built from ComfyUI's own classes with the
real tokenizers ComfyUI ships (T5, CLIP, Qwen2.5-VL).

    clip = build_dit_clip("flux")        # also "sd3", "chroma", "qwen_image"
    require_dit_clip("flux")             # in a test: skip (with the reason) on a host without it

Each is a `comfy.sd.CLIP` around the family's own ClipTarget (the tokenizer and text-encoder
classes `comfy.supported_models.<Family>.clip_target` returns); only the widths are tiny, set
through ComfyUI's `model_options["<name>_model_config"]`. Conditioning shapes (token axis = the
real one; channels tiny):
  flux        T5 context [1, max(256, n), 32], pooled CLIP-L [1, 32]
  chroma      T5 context [1, n, 32] (no padding), no pooled
  sd3         [1, 77 * chunks + max(77, n), 4096] (CLIP-L 32 + CLIP-G 48 channels zero-padded to
              T5's 4096, then T5 along the sequence), pooled [1, 80]
  qwen_image  Qwen2.5-VL [1, n, 32] (template prefix stripped by ComfyUI); a tiny vision tower
              (2 blocks, width 32) so Qwen-Image-Edit's reference image encodes on CPU
  hunyuan_image  Qwen2.5-VL [1, n, 32] (HunyuanImage's template cut), byT5 glyph tokens of the quoted
              text in conditioning_byt5small [1, m, 32] (byT5 tiny too)
  wan         umT5 [1, max(512, n), 32], padding rows zeroed; its SentencePiece model comes from the
              checkpoint (`spiece_model`): here the one ComfyUI ships for its Pile T5
              (comfy/text_encoders/t5_pile_tokenizer/tokenizer.model), which runs the same code
"""
import functools

import torch

from . import host

TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}
TINY_CLIP_L = dict(host.TINY_CLIP)
TINY_CLIP_G = dict(host.TINY_CLIP_G)
TINY_QWEN = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1}
TINY_QWEN_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_layers": 2}

FAMILIES = ("flux", "sd3", "chroma", "qwen_image", "wan", "hunyuan_image")


# the host feature each family's text encoder needs (stable_audio: build_unsupported_clip)
_FEATURES = {"flux": "flux", "sd3": "sd3", "chroma": "chroma", "qwen_image": "qwen_image",
             "stable_audio": "stable_audio", "wan": "wan", "hunyuan_image": "hunyuan_image"}


def skip_reason(family):
    """Why this host cannot build the family's text encoder (None when it can): the host's one
    skip reason (ae_testlib.host)."""
    return host.missing_reason((_FEATURES[family],))


def require_dit_clip(family):
    """Skip the calling test, with the reason, where the host lacks the family's text encoder."""
    import pytest

    reason = skip_reason(family)
    if reason:
        pytest.skip(reason)


def _clip_target(family):
    """The family's ClipTarget as comfy.supported_models builds it (its tokenizer, its encoder)."""
    import comfy.supported_models as sm
    import comfy.supported_models_base

    if family == "qwen_image":
        from comfy.text_encoders import qwen_image

        return comfy.supported_models_base.ClipTarget(qwen_image.QwenImageTokenizer,
                                                      _tiny_vision_qwen_te(qwen_image.te()))
    if family == "hunyuan_image":  # Qwen2.5-VL (hidden layer -3) with a tiny vision tower, and byT5
        from comfy.text_encoders import hunyuan_image

        return comfy.supported_models_base.ClipTarget(
            hunyuan_image.HunyuanImageTokenizer,
            _tiny_vision_qwen_te(hunyuan_image.te(), hunyuan_image.Qwen25_7BVLIModel, "hidden", -3))
    if family == "wan":
        return sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v"}).clip_target({})
    config = {"flux": sm.Flux, "sd3": sm.SD3, "chroma": sm.Chroma}[family]
    unet = {"flux": {"image_model": "flux"}, "sd3": {"in_channels": 16, "pos_embed_scaling_factor": None},
            "chroma": {"image_model": "chroma"}}[family]
    model_config = config(unet)
    # clip_target picks the encoders a checkpoint holds by its keys: name all of them (SD3: all three)
    prefix = model_config.text_encoder_key_prefix[0]
    present = {f"{prefix}{name}.transformer.{key}.final_layer_norm.weight": torch.zeros(1)
               for name, key in (("clip_l", "text_model"), ("clip_g", "text_model"), ("t5xxl", "encoder"))}
    return model_config.clip_target(present)


def _tiny_vision_qwen_te(te_class, model_class=None, layer="last", layer_idx=None):
    """Qwen-Image's text encoder with a tiny vision tower (ComfyUI builds the full 32-block one);
    model_class / layer / layer_idx: another model's Qwen2.5-VL wrapper (HunyuanImage: hidden -3)."""
    from comfy import sd1_clip
    from comfy.text_encoders import llama, qwen_image, qwen_vl

    model_class = model_class or qwen_image.Qwen25_7BVLIModel
    default_layer, default_layer_idx = layer, layer_idx

    class TinyVisionQwen25VLI(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(output_hidden_size=config.hidden_size, device=device,
                                                           dtype=dtype, ops=operations, **TINY_QWEN_VISION)
            self.dtype = dtype

    class TinyVisionQwen25Model(model_class):
        def __init__(self, device="cpu", layer=default_layer, layer_idx=default_layer_idx, dtype=None,
                     attention_mask=True, model_options={}):  # noqa: B006 - ComfyUI's signature
            sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyVisionQwen25VLI,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options=model_options)

    class TinyQwenImageTE(te_class):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, dtype=dtype,
                             model_options={**model_options, "qwen25_7b_class": TinyVisionQwen25Model})

    return TinyQwenImageTE


def _model_options(family):
    width = {"sd3": {**TINY_T5, "d_model": 4096}}.get(family, TINY_T5)  # SD3 joins CLIP and T5 at 4096
    return {"t5xxl_model_config": width, "umt5xxl_model_config": dict(TINY_T5), "clip_l_model_config": dict(TINY_CLIP_L),
            "clip_g_model_config": dict(TINY_CLIP_G), "qwen25_7b_model_config": dict(TINY_QWEN),
            # HunyuanImage's byT5 gets model_options without a model_name: its key is "_model_config"
            # and its Qwen2.5-VL reads hidden layer -3: 4 layers
            **({"_model_config": dict(TINY_T5), "qwen25_7b_model_config": {**TINY_QWEN, "num_hidden_layers": 4}}
               if family == "hunyuan_image" else {})}


@functools.lru_cache(maxsize=None)
def build_dit_clip(family, seed=0):
    """A comfy.sd.CLIP of the family ("flux", "sd3", "chroma", "qwen_image") with ComfyUI's real
    tokenizer and tiny random-weight encoders (cached: do not mutate it). Flux Kontext uses
    Flux's text encoder, Qwen-Image-Edit Qwen-Image's."""
    if family not in FAMILIES:
        raise ValueError(f"build_dit_clip: family must be one of {FAMILIES}, got {family!r}")
    reason = skip_reason(family)
    if reason:
        raise RuntimeError(reason)
    import comfy.sd

    with torch.no_grad():  # ComfyUI builds text encoders outside autograd
        clip = comfy.sd.CLIP(_clip_target(family), tokenizer_data=_tokenizer_data(family),
                             model_options=_model_options(family))
    _init_every_weight(clip.cond_stage_model, seed)
    if family == "wan":
        # umT5's own SentencePiece model ends prompts with id 1, which UMT5XXlModel's special
        # tokens name as the end (after it ComfyUI zeroes the padding rows); the Pile T5 model
        # standing in for it ends with id 2: tell the encoder, so the padding is zeroed as with umT5
        encoder = clip.cond_stage_model.umt5xxl
        encoder.special_tokens = {**encoder.special_tokens, "end": clip.tokenizer.clip_umt5xxl.end_token}
    return clip


def _tokenizer_data(family):
    if family != "wan":
        return {}
    path = host.host_root() / "comfy" / "text_encoders" / "t5_pile_tokenizer" / "tokenizer.model"
    return {"spiece_model": path.read_bytes()}


def _init_every_weight(module, seed):
    """ComfyUI allocates weights with torch.empty, i.e. whatever the memory held, and
    host._init_weights resets only torch's own layer classes: T5's and Qwen's RMS norms are
    ComfyUI classes, so their scales kept leftover memory (outputs, even NaN, by chance). Set
    every parameter: norm scales 1, the rest NaN first so _init_weights draws them all."""
    with torch.no_grad():
        for sub in module.modules():
            is_norm = "norm" in type(sub).__name__.lower()
            for name, param in sub.named_parameters(recurse=False):
                param.fill_(1.0 if is_norm and name == "weight" else float("nan"))
    host._init_weights(module, seed)


def build_unsupported_clip(seed=0):
    """A CLIP whose encoder the pack does not map words for: Stable Audio's T5-base (tiny), from
    comfy.supported_models.StableAudio's own ClipTarget."""
    reason = skip_reason("stable_audio")
    if reason:
        raise RuntimeError(reason)
    import comfy.sd
    import comfy.supported_models as sm

    target = sm.StableAudio({"audio_model": "dit1.0"}).clip_target({})
    with torch.no_grad():
        clip = comfy.sd.CLIP(target, model_options={"t5base_model_config": dict(TINY_T5)})
    _init_every_weight(clip.cond_stage_model, seed)
    return clip
