"""The real ComfyUI host for tests: import it, then build tiny random-weight models from its classes.

Host selection: `COMFYUI_PATH` points at an upstream ComfyUI checkout (CI: 0.19.3 and 0.3.64 from
../shared/hosts). The models are ComfyUI's own UNet, CLIP and ModelPatcher classes with small
widths, so sampling runs on CPU in seconds.
"""
import functools
import importlib
import importlib.util
import os
import pathlib
import sys

import torch

STUBS = pathlib.Path(__file__).resolve().parent.parent / "stubs"

TINY_CLIP = {
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 32,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
TINY_CLIP_G = {**TINY_CLIP, "hidden_act": "gelu", "hidden_size": 48, "projection_dim": 48}


# ComfyUI runs in CPU mode for the suite; tests/device/run.py sets this False before the first
# import_host() so ComfyUI picks the GPU (and its dtypes there) as it does for a user.
CPU_ONLY = True


@functools.lru_cache(maxsize=None)
def import_host():
    """Import ComfyUI once (CPU mode unless CPU_ONLY is False) and return a short description."""
    path = os.environ.get("COMFYUI_PATH")
    if path:
        # absolute for the subprocesses tests start in other folders too (COMFYUI_PATH=.hosts/...)
        os.environ["COMFYUI_PATH"] = path = os.path.abspath(path)
        sys.path.insert(0, path)
    try:
        import torchvision  # noqa: F401
    except Exception:
        # The registry's torchvision wheels are CUDA builds that fail to import with the CPU torch.
        # ComfyUI imports torchvision at module level but SD code paths never call it.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, str(STUBS))
    import comfy.cli_args

    comfy.cli_args.args.cpu = CPU_ONLY  # before comfy.model_management (upstream raises without CUDA)
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.sd  # noqa: F401

    version = importlib.import_module("comfyui_version").__version__
    return f"upstream ComfyUI {version} at {host_root()}"


def host_root():
    """The folder that holds the host's `comfy` package (a ComfyUI checkout's root, upstream)."""
    import comfy

    return pathlib.Path(list(comfy.__path__)[0]).resolve().parent


# What a test may need from the host beyond what both hosts have. This is the suite's ONE way to
# skip (conftest fails any other skip): a test that needs a newer host than the one running says
# so with `@host.requires("flux")` (or `pytestmark = host.requires(...)` for a module). Features
# are detected by what exists (modules, attributes, files), never by version numbers, and only by
# existence: a module that exists but fails to import fails its tests instead of skipping them.
NEWER_HOST = "upstream ComfyUI 0.19.3 (../shared/hosts/comfyui-0.19.3.tar.xz, run with COMFYUI_PATH)"
FEATURES = {
    # name: (what it is, for the skip reason; the specs that must all exist: "module[:attribute]"
    #        or "file:PATH" relative to the host root; an attribute may be dotted: "module:Class.method")
    "flux": ("Flux DiT models", ["comfy.ldm.flux.model", "comfy.text_encoders.flux"]),
    "chroma": ("Chroma DiT models with their T5 text encoder",
               ["comfy.ldm.chroma.model", "comfy.text_encoders.pixart_t5"]),
    "sd3": ("SD3 / SD3.5 MMDiT models with their text encoders",
            ["comfy.ldm.modules.diffusionmodules.mmdit", "comfy.text_encoders.sd3_clip"]),
    "qwen_image": ("Qwen-Image DiT models with the Qwen2.5-VL text encoder",
                   ["comfy.ldm.qwen_image.model", "comfy.text_encoders.qwen_image"]),
    "stable_audio": ("Stable Audio's T5-base text encoder", ["comfy.text_encoders.sa_t5"]),
    "wan": ("Wan 2.1 / 2.2 video models with the umT5 text encoder",
            ["comfy.ldm.wan.model:VaceWanModel", "comfy.supported_models:WAN22_T2V", "comfy.text_encoders.wan"]),
    "z_image": ("Z-Image models (supported_models.ZImage, Lumina2's NextDiT) with the Qwen3-4B text encoder",
                ["comfy.supported_models:ZImage", "comfy.text_encoders.z_image:ZImageTokenizer"]),
    "flux2_klein": ("Flux.2 [klein]'s Qwen3-4B / Qwen3-8B text encoders (KleinTokenizer, KleinTokenizer8B)",
                    ["comfy.text_encoders.flux:KleinTokenizer8B", "comfy.text_encoders.flux:klein_te"]),
    "hunyuan_image": ("HunyuanImage 2.1 (HunyuanVideo's model class with a 2-D patch, byT5 glyph text)",
                      ["comfy.supported_models:HunyuanImage21", "comfy.text_encoders.hunyuan_image"]),
    "model_wrappers": ("model wrappers (comfy.patcher_extension: APPLY_MODEL)", ["comfy.patcher_extension"]),
    "attention_override": ("the optimized_attention_override hook of transformer_options",
                           ["comfy.ldm.modules.attention:wrap_attn"]),
    # core nodes / model code that only newer hosts have (docs/comfyui_versions.md)
    "flux_kv_cache": ("the core Flux KV Cache node (comfy_extras.nodes_flux.FluxKVCache)",
                      ["comfy_extras.nodes_flux:FluxKVCache"]),
    "flux2": ("Flux.2 models (Flux's model class with patch size 1)", ["comfy.supported_models:Flux2"]),
    "nag": ("the core Normalized Attention Guidance node (comfy_extras.nodes_nag.NAGuidance)",
            ["comfy_extras.nodes_nag:NAGuidance"]),
    "index_timestep_zero": ("Qwen-Image-Edit-2511's index_timestep_zero reference method (the "
                            "block's two-timestep gate)",
                            ["comfy.ldm.qwen_image.model:QwenImageTransformerBlock._apply_gate"]),
    "server": ("the ComfyUI server with its web frontend (main.py, server.py, "
               "comfyui_frontend_package)", ["file:main.py", "file:server.py", "comfyui_frontend_package"]),
}


def _spec_exists(spec):
    if spec.startswith("file:"):
        return (host_root() / spec[len("file:"):]).is_file()
    module, _, attribute = spec.partition(":")
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
    if not found or not attribute:
        return found
    found = importlib.import_module(module)
    for name in attribute.split("."):
        if not hasattr(found, name):
            return False
        found = getattr(found, name)
    return True


@functools.lru_cache(maxsize=None)
def has(feature):
    """Whether the running host has `feature` (a key of FEATURES)."""
    import_host()
    return all(_spec_exists(spec) for spec in FEATURES[feature][1])


_ISSUED_REASONS = set()  # the skip reasons handed out, so conftest can tell a host skip from others


def missing_reason(features):
    """The skip reason for the features this host lacks, or None when it has them all."""
    _check_known(features)
    missing = [name for name in features if not has(name)]
    if not missing:
        return None
    what = "; ".join(FEATURES[name][0] for name in missing)
    reason = (f"needs a newer host: {what}, which {NEWER_HOST} has; this host ({import_host()}) "
              f"lacks {'it' if len(missing) == 1 else 'them'}")
    _ISSUED_REASONS.add(reason)
    return reason


def is_host_skip(text):
    """Whether a skip's text carries a reason handed out by missing_reason."""
    return any(reason in text for reason in _ISSUED_REASONS)


def _check_known(features):
    unknown = [name for name in features if name not in FEATURES]
    if not features or unknown:
        raise ValueError(f"host.requires: unknown feature(s) {unknown}; known: {sorted(FEATURES)}")


def requires(*features):
    """Mark a test (or, as `pytestmark`, a module) as needing these host features."""
    _check_known(features)
    import pytest

    return pytest.mark.host_requires(*features)


def module_requires(*features):
    """Call at the top of a test module whose imports need these features, before those imports:
    where the host lacks them the whole module skips (with the same reason as `requires`)."""
    reason = missing_reason(features)
    if reason:
        import pytest

        pytest.skip(reason, allow_module_level=True)


def _init_weights(module, seed):
    """ComfyUI builds layers without initialising them; give every layer PyTorch's default init."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for sub in module.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d,
                     torch.nn.Embedding) + norm_types:
            if isinstance(sub, base):
                base.reset_parameters(sub)
                break
    for name, param in module.named_parameters():
        if name.endswith("position_embedding.weight") or name.endswith("position_ids"):
            continue
        if torch.isnan(param).any() or (param.dtype.is_floating_point and not param.abs().sum()):
            with torch.no_grad():
                param.normal_(0, 0.02)
    torch.random.set_rng_state(generator_state)


# Tiny UNet configurations keep the real architectures' level structure (where attention sits,
# which levels are downsampled) with small widths and one res-block per level.
UNET_CONFIGS = {
    "sd15": dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=[1, 1, 1, 1],
                 transformer_depth=[1, 1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_middle=1, context_dim=32, use_linear_in_transformer=False,
                 adm_in_channels=None),
    "sd2": dict(model_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=[1, 1, 1, 1],
                transformer_depth=[1, 1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_middle=1, context_dim=32, use_linear_in_transformer=True,
                adm_in_channels=None),
    "sdxl": dict(model_channels=32, channel_mult=[1, 2, 4], num_res_blocks=[1, 1, 1],
                 transformer_depth=[0, 1, 2], transformer_depth_output=[0, 0, 1, 1, 2, 2],
                 transformer_depth_middle=1, context_dim=80, use_linear_in_transformer=True,
                 adm_in_channels=48 + 6 * 256, num_classes="sequential"),
}


# Full-size SD1.5 (860M parameters) and SDXL (2.6B) for benchmarks: the real widths and depths.
FULL_CONFIGS = {
    "sd15": dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                 adm_in_channels=None),
    "sdxl": dict(model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True,
                 adm_in_channels=2816, num_classes="sequential", num_head_channels=64, num_heads=-1),
}


def _full_unet_config(family, in_channels, size="tiny"):
    sizes = UNET_CONFIGS if size == "tiny" else FULL_CONFIGS
    config = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                  in_channels=in_channels, out_channels=4, use_temporal_resblock=False,
                  use_temporal_attention=False, num_head_channels=-1, num_heads=8)
    config.update(sizes[family])  # SDXL full size: 64-channel heads, as the real one
    return config


def unet_model_config(family="sd15", ip2p=False, size="tiny"):
    """The supported_models config (ComfyUI's own class for the family) of a `size` UNet."""
    import_host()
    import comfy.supported_models as sm

    classes = {("sd15", False): sm.SD15, ("sd15", True): sm.SD15_instructpix2pix,
               ("sd2", False): sm.SD20, ("sdxl", False): sm.SDXL,
               ("sdxl", True): sm.SDXL_instructpix2pix}
    config = _full_unet_config(family, 8 if ip2p else 4, size)
    model_config = classes[(family, ip2p)](config)
    # the family's class adds its own head layout (SD2: 64-channel heads); keep the config's
    model_config.unet_config.update({key: config[key] for key in ("num_heads", "num_head_channels")})
    return model_config


def build_model(family="sd15", ip2p=False, seed=0, size="tiny", on_device=False, dtype=None):
    """A ModelPatcher around a random-weight UNet built by ComfyUI's own model classes.

    size "tiny" (tests) or "full" (benchmarks; SD1.5, SD1.5-IP2P and SDXL). On the CPU in float32
    (or `dtype`, computed in it), unless on_device: built as ComfyUI loads a checkpoint on its
    device (`on_comfy_device`).
    """
    import_host()
    import comfy.model_base
    import comfy.model_patcher

    model_config = unet_model_config(family, ip2p, size)
    if on_device:
        return on_comfy_device(model_config, lambda model: _init_weights(model, seed), dtype)
    if dtype is not None:  # e.g. the device run's fp16 / bf16 NaN checks: computed in that dtype
        model_config.set_inference_dtype(dtype, None)
    if family == "sd2":
        model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        model = model_config.get_model({})
    _init_weights(model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def on_comfy_device(model_config, init, dtype=None):
    """Build `model_config`'s model as ComfyUI loads a diffusion model
    (comfy.sd.load_diffusion_model_state_dict): on its torch device, in the dtype it picks there
    for this many parameters (unless `dtype` is given) with manual casting where the device needs
    it, then init(model) in place. Built on the device directly: a 12B model never sits in CPU
    memory in float32. For tests/device/run.py."""
    import comfy.model_management as mm
    import comfy.model_patcher

    load_device = mm.get_torch_device()
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:  # the parameter count decides only when memory is short; a meta build gives it
        params = sum(p.numel() for p in model_config.get_model({}, device="meta").parameters())
        dtype = mm.unet_dtype(model_params=params, supported_dtypes=supported)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, supported))
    with torch.no_grad():
        model = model_config.get_model({}, device=load_device)
        init(model)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def _sd1_clip_module():
    import comfy.sd1_clip

    return comfy.sd1_clip


def _sd2_tokenizer():
    for name in ("comfy.text_encoders.sd2_clip", "comfy.sd2_clip"):
        try:
            return importlib.import_module(name).SD2Tokenizer
        except ImportError:
            continue
    raise ImportError("no SD2Tokenizer in this ComfyUI")


def build_clip(family="sd15", seed=0):
    """A comfy.sd.CLIP with ComfyUI's real tokenizer and a tiny random-weight text encoder."""
    import_host()
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    sd1_clip = _sd1_clip_module()
    if family == "sd15":
        clip_class = functools.partial(sd1_clip.SD1ClipModel, clip_model=sd1_clip.SDClipModel,
                                       textmodel_json_config=dict(TINY_CLIP))
        tokenizer = sd1_clip.SD1Tokenizer
    elif family == "sd2":
        clip_class = functools.partial(
            sd1_clip.SD1ClipModel, clip_name="h", clip_model=sd1_clip.SDClipModel,
            textmodel_json_config=dict(TINY_CLIP), layer="hidden", layer_idx=-2,
            special_tokens={"start": 49406, "end": 49407, "pad": 0})
        tokenizer = _sd2_tokenizer()
    elif family == "sdxl":
        clip_class = TinySDXLClip
        tokenizer = comfy.sdxl_clip.SDXLTokenizer
    else:
        raise ValueError(family)
    target = comfy.supported_models_base.ClipTarget(tokenizer, clip_class)
    with torch.no_grad():  # ComfyUI builds text encoders outside autograd
        clip = comfy.sd.CLIP(target)
    _init_weights(clip.cond_stage_model, seed)
    return clip


def _tiny_sdxl_clip_class():
    import comfy.sdxl_clip

    sd1_clip = _sd1_clip_module()

    class _TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        """SDXLClipModel's structure (CLIP-L penultimate + CLIP-G penultimate, pooled from G)."""

        def __init__(self, device="cpu", dtype=None, **_):
            torch.nn.Module.__init__(self)
            self.clip_l = sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                               layer_norm_hidden_state=False,
                                               textmodel_json_config=dict(TINY_CLIP))
            self.clip_g = sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                               layer_norm_hidden_state=False, return_projected_pooled=True,
                                               textmodel_json_config=dict(TINY_CLIP_G),
                                               special_tokens={"start": 49406, "end": 49407, "pad": 0})
            self.dtypes = {dtype}

    return _TinySDXLClip


def TinySDXLClip(**kwargs):  # noqa: N802 - used as a class by comfy.sd.CLIP
    return _tiny_sdxl_clip_class()(**kwargs)


# Workflows whose nodes or loader options only newer hosts have (name without .json -> features):
# tests/test_workflows.py and the e2e tests skip them elsewhere with the host reason.
WORKFLOW_FEATURES = {"flux2_record_attention": ("flux2",), "z_image_record_attention": ("z_image",),
                     "foi_qwen_image_edit_2511": ("index_timestep_zero",)}


def workflow_missing_reason(name):
    """The host skip reason for a workflow (file name, with or without .json), or None."""
    features = WORKFLOW_FEATURES.get(name[:-5] if name.endswith(".json") else name)
    return missing_reason(features) if features else None
