"""Random-weight model files with the full real architectures, under the names the workflows use.

Each builder makes its file from ComfyUI's own classes (the model's state_dict, converted to the
checkpoint key layout by ComfyUI's own `state_dict_for_saving`), in fp16, with PyTorch's default
initialisation (small values, so outputs stay finite). ComfyUI's model detection reads widths,
channel counts and block counts from the weights, so the server loads these as the real models.

Files are cached between runs on one machine, keyed by GENERATOR_VERSION (bump it when a builder
changes); a missing file is rebuilt. New workflows (e.g. DiT models) join by adding a builder to
BUILDERS under the file name their loader node names.
"""
import inspect
import os
import pathlib
import re
import time

import torch

GENERATOR_VERSION = "2"  # 2: checkpoints hold the UNet on ComfyUI 0.19.3 too
CACHE = pathlib.Path(os.environ.get("ATTENTION_EDIT_E2E_CACHE",
                                    pathlib.Path.home() / ".cache" / "attention-edit" / "e2e"))
DTYPE = torch.float16
# a widget value naming a file the server must have (model, LoRA, input image)
FILE_VALUE = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|sft|gguf|png|jpe?g|webp|mp4)$", re.IGNORECASE)
INPUT_SIZE = (128, 128)  # (width, height) of the Load Image input


def _sd15_config(in_channels):
    """ComfyUI's SD1.5 model config with the real UNet widths and depths (860M parameters)."""
    import comfy.supported_models as sm
    from ae_testlib import host

    model_class = sm.SD15_instructpix2pix if in_channels == 8 else sm.SD15
    config = model_class(host._full_unet_config("sd15", in_channels, size="full"))
    config.set_inference_dtype(DTYPE, None)
    return config


def _random(module):
    from ae_testlib import host

    host._init_weights(module, seed=0)
    return module


def _checked(state_dict, name):
    """fp16, contiguous, finite: a file that loads and samples without NaNs."""
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().to(DTYPE if tensor.is_floating_point() else tensor.dtype).contiguous()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RuntimeError(f"{name}: generated weight {key} is not finite")
        out[key] = tensor
    return out


def _sd15_unet(in_channels):
    config = _sd15_config(in_channels)
    with torch.no_grad():
        model = _random(config.get_model({}))
    return config, model


def _sd15_clip_vae_state_dicts():
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip

    with torch.no_grad():
        clip = _random(comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=DTYPE))  # ViT-L/14 text
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                    "dropout": 0.0}
        vae = _random(comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4))
    return clip.state_dict(), vae.state_dict()


def _for_saving(model, clip_sd, vae_sd):
    """One checkpoint state dict in the standard key layout. ComfyUI 0.3.x's state_dict_for_saving
    reads the UNet's weights itself; newer ones (0.19.3) take them as their first argument."""
    params = inspect.signature(model.state_dict_for_saving).parameters
    unet = (model.diffusion_model.state_dict(),) if "unet_state_dict" in params else ()
    state_dict = model.state_dict_for_saving(*unet, clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    if not any(key.startswith("model.diffusion_model.") for key in state_dict):
        raise RuntimeError("the generated checkpoint has no UNet weights (model.diffusion_model.*)")
    return state_dict


def sd15_checkpoint(in_channels):
    """SD1.5 (4 input channels), SD1.5 inpainting (9) or InstructPix2Pix (8): UNet, CLIP-L, VAE."""
    def build(path):
        config, model = _sd15_unet(in_channels)
        clip_sd, vae_sd = _sd15_clip_vae_state_dicts()
        state_dict = _checked(_for_saving(model, clip_sd, vae_sd), path.name)
        del model
        save(state_dict, path)
    return build


def controlnet(path):
    """A full SD1.5 ControlNet in the original `control_model.` layout (3-channel hint)."""
    import comfy.cldm.cldm

    config = _sd15_config(4)
    unet_config = dict(config.unet_config)
    unet_config.pop("out_channels")
    with torch.no_grad():
        net = _random(comfy.cldm.cldm.ControlNet(hint_channels=3, device="cpu", **unet_config))
    state_dict = {f"control_model.{k}": v for k, v in net.state_dict().items()}
    save(_checked(state_dict, path.name), path)


def kohya_lora(path, rank=4):
    """A kohya-format SD1.5 LoRA on every attention projection of the UNet and the text encoder.

    kohya names UNet layers the diffusers way (down_blocks_0_attentions_0_...); ComfyUI's key map
    also lists its own names for the same weights, which a real LoRA does not use.
    """
    import comfy.lora
    import comfy.sd1_clip

    config = _sd15_config(4)
    with torch.device("meta"):  # only names and shapes are needed
        model = config.get_model({})
        clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=DTYPE)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map.update(comfy.lora.model_lora_keys_clip(clip, {}))
    shapes = {**{k: v.shape for k, v in model.state_dict().items()},
              **{k: v.shape for k, v in clip.state_dict().items()}}
    attention = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_.*_attn[12]_to_(q|k|v|out_0)$"
                           r"|^lora_te_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj$")
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for lora_key, weight_key in sorted(key_map.items()):
        if not attention.match(lora_key):
            continue
        out_features, in_features = shapes[weight_key][:2]
        state_dict[f"{lora_key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
        state_dict[f"{lora_key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
        state_dict[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    if not state_dict:
        raise RuntimeError("no LoRA keys matched the SD1.5 attention layers")
    save(_checked(state_dict, path.name), path)


def input_image(path):
    """The Load Image input: a smooth colour pattern (random-weight models don't need a photo)."""
    import numpy as np
    from PIL import Image

    width, height = INPUT_SIZE
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 9.0) * np.cos(y / 7.0)], axis=-1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)


def save(state_dict, path):
    tmp = path.with_name(path.name + ".part")
    if path.suffix == ".ckpt":  # ComfyUI loads .ckpt with torch.load (weights_only); a plain dict
        torch.save({"state_dict": state_dict}, tmp)
    else:
        import safetensors.torch

        safetensors.torch.save_file(state_dict, str(tmp))
    os.replace(tmp, path)


def input_video(path, frames=17):
    """The Load Video input (Wan workflows): 1 + 4k frames of a moving colour pattern, MPEG-4 in mp4."""
    import av
    import numpy as np

    width, height = INPUT_SIZE
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            rgb = np.stack([(x + 4 * t) % width / width, y / height, 0.5 + 0.5 * np.sin((x + 4 * t) / 9.0)], axis=-1)
            frame = av.VideoFrame.from_ndarray((rgb * 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# file name -> (ComfyUI folder it goes in, builder(path))
BUILDERS = {
    "v1-5-pruned-emaonly.safetensors": ("checkpoints", sd15_checkpoint(4)),
    "sd-v1-5-inpainting.ckpt": ("checkpoints", sd15_checkpoint(9)),
    "instruct-pix2pix-00-22000.safetensors": ("checkpoints", sd15_checkpoint(8)),
    "control_v11f1e_sd15_tile_fp16.safetensors": ("controlnet", controlnet),
    "your_sd15_lora.safetensors": ("loras", kohya_lora),
    "example.png": ("input", input_image),
    "example.mp4": ("input", input_video),
}


# Model files no run on this machine can have. ComfyUI 0.3.64 builds these text encoders with
# fixed depths (T5-XXL: 24 blocks from t5_config_xxl.json; Qwen2.5-VL-7B: 28 layers), so a smaller
# stand-in leaves layers uninitialised, and the real sizes (9.5 GB / 16 GB in fp16, minutes of CPU
# per prompt) do not fit the 2-core, 24 GB CI machine. A workflow that names one is loaded and
# converted by the frontend, not run; its nodes run on tiny models in the pytest suite.
TOO_LARGE = {
    "t5xxl_fp16.safetensors": "a full T5-XXL text encoder (4.7 B parameters, 24 fixed blocks)",
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": "a full Qwen2.5-VL-7B text encoder (8.3 B parameters, 28 fixed layers)",
    "qwen_3_4b.safetensors": "a full Qwen3-4B text encoder (4 B parameters, 36 fixed layers)",
    "qwen_2.5_vl_7b.safetensors": "a full Qwen2.5-VL-7B text encoder (8.3 B parameters, 28 fixed layers; HunyuanImage 2.1)",
    # Flux.2 [dev] (ComfyUI's template): a 32 B diffusion model and the Mistral-Small-3.1 24 B text encoder
    "flux2_dev_fp8mixed.safetensors": "the Flux.2 [dev] diffusion model (32 B parameters)",
    "mistral_3_small_flux2_bf16.safetensors": "a full Mistral-Small-3.1 text encoder (24 B parameters, 40 layers)",
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": "a full umT5-XXL text encoder (Wan; 5.7 B parameters, 24 fixed blocks)",
}


def not_runnable(workflow):
    """Why a UI workflow cannot run on this machine (None when it can)."""
    large = sorted(TOO_LARGE[name] for name in files_named(workflow) if name in TOO_LARGE)
    return f"needs {' and '.join(large)}" if large else None


# Where a loader node may list a placeholder from (ComfyUI's model folders, by the loaders' inputs).
PLACEHOLDER_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "clip_vision", "loras", "controlnet")


def install_placeholders(names, base_directory):
    """Empty files under the model names a not-runnable workflow uses, in every model folder a
    loader may list them from: enough for the server's prompt validation (POST /prompt checks that
    each file name is in its loader's list), which is all such a workflow gets here."""
    for name in sorted(names):
        for folder in PLACEHOLDER_FOLDERS:
            target = pathlib.Path(base_directory) / "models" / folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()


def files_named(workflow):
    """The file names a UI-format workflow's widgets refer to."""
    names = set()
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        values = values.values() if isinstance(values, dict) else values
        names.update(v for v in values if isinstance(v, str) and FILE_VALUE.search(v))
    return names


def check_known(workflows):
    """{workflow name: UI workflow}: every model or input file a workflow names has a builder;
    otherwise a clear error that says where to add one."""
    unknown = {f"{workflow_name}: {name}" for workflow_name, workflow in workflows.items()
               if not not_runnable(workflow) for name in files_named(workflow) if name not in BUILDERS}
    if unknown:
        raise LookupError("workflow names a file the e2e test cannot generate (add a builder for it to "
                          f"BUILDERS in tests/e2e/models.py): {', '.join(sorted(unknown))}")


def ensure(name, log=print):
    """The cached file for `name`, built first when missing."""
    folder, build = BUILDERS[name]
    path = CACHE / GENERATOR_VERSION / folder / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        build(path)
        log(f"built {folder}/{name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    return folder, path


def install(names, base_directory, log=print):
    """Link the files into a ComfyUI base directory's models/ and input/ folders."""
    for name in sorted(names):
        folder, path = ensure(name, log)
        target = pathlib.Path(base_directory) / (folder if folder == "input" else f"models/{folder}") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(path)
