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
  flux2       Flux.2 [dev]'s Mistral-Small-3.1 (31 tiny layers: ComfyUI reads layers 10, 20, 30)
              [1, n, 3 * 32], n = the templated prompt's tokens (model_base.Flux2 left-pads to 512);
              its tekken tokenizer comes from the checkpoint (`tekken_model`): here mistral-common's
              tekken_240911.json (tekken_data())
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
TINY_MISTRAL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 31, "num_attention_heads": 2,
                "num_key_value_heads": 1}
# Qwen3 encoders (build_dit_clip takes them too): Z-Image's, Flux.2 [klein] 4B's and 9B's (Qwen3-8B)
QWEN3_FAMILIES = ("z_image", "klein", "klein_8b")
# Klein reads Qwen3's hidden states 9, 18 and 27: the tiny encoder keeps 28 layers (of width 32)
TINY_QWEN3 = {**TINY_QWEN, "num_hidden_layers": 28}
# flux2: Flux.2 [dev]'s Mistral (tests/test_tekken_tokens.py); hunyuan_image_qwen_only: HunyuanImage's
# encoder as the single CLIPLoader builds it (comfy.sd: te(byt5=False), no glyph encoder)
BUILDABLE = FAMILIES + ("flux2", "hunyuan_image_qwen_only") + QWEN3_FAMILIES


# the host feature each family's text encoder needs (stable_audio: build_unsupported_clip)
_FEATURES = {"flux": "flux", "sd3": "sd3", "chroma": "chroma", "qwen_image": "qwen_image",
             "stable_audio": "stable_audio", "wan": "wan", "flux2": "flux2", "z_image": "z_image",
             "klein": "flux2_klein", "klein_8b": "flux2_klein",
             "hunyuan_image": "hunyuan_image", "hunyuan_image_qwen_only": "hunyuan_image"}


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
    if family == "z_image":
        return sm.ZImage({"image_model": "lumina2", "dim": 3840}).clip_target({})
    if family in ("klein", "klein_8b"):  # what supported_models.Flux2.clip_target picks for a Qwen3 checkpoint
        from comfy.text_encoders import flux

        tokenizer = flux.KleinTokenizer if family == "klein" else flux.KleinTokenizer8B
        model_type = "qwen3_4b" if family == "klein" else "qwen3_8b"
        return comfy.supported_models_base.ClipTarget(tokenizer, flux.klein_te(model_type=model_type))
    if family.startswith("hunyuan_image"):  # Qwen2.5-VL (hidden layer -3) with a tiny vision tower, and byT5
        from comfy.text_encoders import hunyuan_image

        return comfy.supported_models_base.ClipTarget(
            hunyuan_image.HunyuanImageTokenizer,
            _tiny_vision_qwen_te(hunyuan_image.te(byt5=family == "hunyuan_image"), hunyuan_image.Qwen25_7BVLIModel,
                                 "hidden", -3))
    if family == "wan":
        return sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v"}).clip_target({})
    if family == "flux2":  # [dev]: the checkpoint's Mistral-Small-3.1 keys (all 40 layers: not pruned)
        prefix = "text_encoders.mistral3_24b.transformer."
        present = {f"{prefix}model.norm.weight": torch.zeros(1),
                   f"{prefix}model.layers.39.post_attention_layernorm.weight": torch.zeros(1)}
        return sm.Flux2({"image_model": "flux2", "hidden_size": 6144}).clip_target(present)
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
            "mistral3_24b_model_config": dict(TINY_MISTRAL), "qwen3_4b_model_config": dict(TINY_QWEN3),
            "qwen3_8b_model_config": dict(TINY_QWEN3),
            # HunyuanImage's byT5 gets model_options without a model_name: its key is "_model_config"
            # and its Qwen2.5-VL reads hidden layer -3: 4 layers
            **({"_model_config": dict(TINY_T5), "qwen25_7b_model_config": {**TINY_QWEN, "num_hidden_layers": 4}}
               if family.startswith("hunyuan_image") else {})}


@functools.lru_cache(maxsize=None)
def build_dit_clip(family, seed=0):
    """A comfy.sd.CLIP of the family ("flux", "sd3", "chroma", "qwen_image") with ComfyUI's real
    tokenizer and tiny random-weight encoders (cached: do not mutate it). Flux Kontext uses
    Flux's text encoder, Qwen-Image-Edit Qwen-Image's."""
    if family not in BUILDABLE:
        raise ValueError(f"build_dit_clip: family must be one of {BUILDABLE}, got {family!r}")
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
    if family == "flux2":
        return {"tekken_model": tekken_data()}
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


# Mistral's tekken special tokens 0-19 (mistral-common's Tekkenizer.DEPRECATED_SPECIAL_TOKENS; the
# rest up to the file's default_num_special_tokens are "<SPECIAL_i>"), which a checkpoint's
# tekken.json lists under "special_tokens" and ComfyUI's load_mistral_tokenizer reads there
TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")


def tekken_file():
    """mistral-common's tekken_240911.json (the PyPI package ships real tekken files), found
    without importing the package (its import needs tiktoken and pydantic, which the tests do not)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise RuntimeError("the Flux.2 [dev] tokenizer tests need the mistral-common package (pip install "
                           "mistral-common; .ci/run installs it) for a real tekken file")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "tekken_240911.json"


@functools.lru_cache(maxsize=None)
def tekken_data():
    """The tekken file as a Flux.2 checkpoint carries it (`tekken_model` bytes, special tokens
    listed), and ComfyUI's Mistral loader made to run on the installed transformers (_mistral_compat)."""
    import json

    data = json.loads(tekken_file().read_text())
    count = data["config"]["default_num_special_tokens"]
    data["special_tokens"] = [{"rank": i, "token_str": TEKKEN_SPECIALS[i] if i < len(TEKKEN_SPECIALS)
                               else f"<SPECIAL_{i}>", "is_control": True} for i in range(count)]
    data.pop("image", None)
    raw = json.dumps(data).encode()
    _mistral_compat(raw)
    return raw


def _mistral_compat(raw):
    """ComfyUI 0.19.3's load_mistral_tokenizer calls transformers 4.x's
    `MistralConverter(vocab=..., additional_special_tokens=...)`; transformers 5 (the dev venvs'
    5.25) takes a tekken file path instead (`vocab_file`), and imports mistral-common's tekkenizer
    when that package is importable (it is, installed without its dependencies, for the data
    file). Where the host's transformers is the 5.x one, give ComfyUI's call the 5.x converter on
    the same tekken data, written to a file, which builds the same byte-level BPE; mistral-common
    is then not needed at import time. Test-only: a user's ComfyUI pins its own transformers."""
    import inspect
    import tempfile

    import transformers.utils.import_utils as import_utils

    if "is_mistral_common_available" in vars(import_utils):
        import_utils.is_mistral_common_available = lambda *args, **kwargs: False
    try:
        import transformers.integrations.mistral as mistral
        converter = mistral.MistralConverter
    except (ImportError, AttributeError):
        return
    if "vocab_file" not in inspect.signature(converter.__init__).parameters:
        return  # transformers 4.x: ComfyUI's call works as written
    handle = tempfile.NamedTemporaryFile("wb", suffix="_tekken.json", delete=False)
    handle.write(raw)
    handle.close()

    class ComfyCallConverter(converter):
        def __init__(self, vocab=None, additional_special_tokens=None, **kwargs):
            super().__init__(handle.name)

    mistral.MistralConverter = ComfyCallConverter


def encode_like_clip_text_encode(clip, text):
    """Attention Text Encode's CONDITIONING for `text`, checked to be CLIP Text Encode's bit for bit
    (every tensor, every option) plus the word annotation only."""
    from . import registry
    from .pack import pack_module

    annotation = pack_module("attention.tokens").ANNOTATION_KEY
    with torch.inference_mode():
        ours = pack_module("nodes.encode").AttentionTextEncode().run(clip, text)[0]
        theirs = registry.core_nodes()["CLIPTextEncode"]().encode(clip, text)[0]
    assert len(ours) == len(theirs)
    for (cond, options), (cond_ref, options_ref) in zip(ours, theirs):
        assert torch.equal(cond, cond_ref)
        assert set(options) - {annotation} == set(options_ref)
        for key, value in options_ref.items():
            assert torch.equal(options[key], value) if torch.is_tensor(value) else options[key] == value, key
    return ours
