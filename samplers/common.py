"""Sampling plumbing shared by the pack's samplers: schedule, noise, progress/preview, KSampler."""
import importlib

from ..attention.families import family_of
from ..masks.validate import check_finite, check_number


def schedule(model, steps, sampler_name, scheduler, denoise=1.0):
    """The sigmas ComfyUI's KSampler would use for these settings (denoise already applied)."""
    import comfy.samplers

    ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    return ksampler.sigmas


def check_sampling(steps, cfg=None, denoise=None):
    """KSampler's numeric inputs, by their node names: steps >= 1, cfg >= 0, denoise in (0, 1]."""
    check_number(steps, "steps", 1, integer=True)
    if cfg is not None:
        check_number(cfg, "cfg", 0.0)
    if denoise is not None:
        check_number(denoise, "denoise", 0.0, 1.0, low_open=True,
                     hint="denoise 0 runs no sampling step, so nothing would be recorded or edited")


def refuse_dit(model, method):
    """A clear error for a method that runs on UNets only, when `model` is a DiT (any: Flux.2 and
    families the pack does not read as well; structure, not family_of, decides)."""
    diffusion_model = model.model.diffusion_model
    if not hasattr(diffusion_model, "input_blocks"):
        family = family_of(model)
        name = family.name if family is not None else type(diffusion_model).__name__
        raise TypeError(
            f"{method} does not support {name} (a DiT model) yet: it works on SD1.x, SD2.x and "
            "SDXL UNets. On DiT models use InstDiffEdit (Flux, Flux.2, SD3, Qwen-Image, Z-Image, HunyuanImage "
            "2.1, Wan video) or FoI (Qwen-Image-Edit, Flux Kontext, Flux.2), or load a UNet checkpoint for this node.")


def latent_broadcast(mask, like):
    """[B, H, W] mask -> broadcastable against latents [B, C, H, W], or Qwen-Image's one-frame
    [B, C, 1, H, W]; a video mask [B, F, H, W] against a video latent [B, C, F, H, W]."""
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - mask.dim())), *mask.shape[1:])


def _latent_format(model):
    try:
        return model.get_model_object("latent_format")
    except AttributeError:
        return getattr(getattr(model, "model", None), "latent_format", None)


def model_latent_channels(model):
    """The channel count of the model's own latent format (4 for SD1.x / SDXL, 16 for SD3 / Flux,
    ...), or None where the model does not say."""
    return getattr(_latent_format(model), "latent_channels", None)


def model_name(model):
    family = family_of(model)
    return family.name if family is not None else "this model"


def check_latent_shape(model, samples, input_name, what="latent"):
    """An image latent as the model's code unpacks it: [B, C, H, W], or [B, C, 1, H, W] where the
    latent format has a frame axis (Qwen-Image's Wan VAE). Checked here because the model's own
    code fails on anything else with a bare reshape / unpack error."""
    frame_axis = getattr(_latent_format(model), "latent_dimensions", 2) == 3
    shape = tuple(samples.shape)
    video = getattr(family_of(model), "video", False)  # Wan: any number of frames
    if samples.dim() == (5 if frame_axis else 4) and (not frame_axis or video or shape[2] == 1):
        return samples
    if video:
        raise ValueError(
            f"the '{input_name}' {what} has {samples.dim()} dimensions (shape {shape}) but {model_name(model)} takes "
            "video latents [batch, channels, frames, height, width]. Connect a Wan latent (EmptyHunyuanLatentVideo, "
            "WanImageToVideo, Wan22ImageToVideoLatent, or VAE Encode of a video with the Wan VAE).")
    takes = "[batch, channels, 1, height, width] (one frame)" if frame_axis else "[batch, channels, height, width]"
    found = (f"{shape[2]} frames" if frame_axis and samples.dim() == 5
             else f"{samples.dim()} dimensions")
    raise ValueError(
        f"the '{input_name}' {what} has {found} (shape {shape}) but {model_name(model)} takes image "
        f"latents {takes}: the pack edits one image per batch item. Connect an image latent (VAE "
        "Encode of an image, or the empty latent node for this model), not a video, a layered "
        "(Qwen-Image Layered) or a batched-frames latent.")


def check_latent(model, samples, input_name, what="latent", noise_mask=None):
    """The one latent check of every sampler: an image LATENT of the model's own shape and channel
    count, finite, with a finite noise mask (Set Latent Noise Mask) if it has one. Returns `samples`."""
    check_latent_shape(model, samples, input_name, what)
    channels = model_latent_channels(model)
    if channels is not None and (samples.dim() < 2 or samples.shape[1] != channels):
        found = samples.shape[1] if samples.dim() >= 2 else "no"
        raise ValueError(
            f"the '{input_name}' {what} has {found} channels but this model works on {channels}-channel "
            "latents: it was made for another model family. Encode the image with the VAE that "
            "matches the model (the one from the same checkpoint), or make the empty latent for "
            "this model.")
    check_finite(samples, f"the '{input_name}' {what}",
                 "the node that made it produced invalid values (VAE Encode in fp16 can overflow: start "
                 "ComfyUI with --fp32-vae)")
    check_finite(noise_mask, f"the '{input_name}' {what}'s noise mask",
                 "the node that made the mask produced invalid values; check it, or paint the mask")
    return samples


# what a LATENT dict may carry for the samplers only: ComfyUI's samplers (0.19.3) read it and
# leave it out of their output (EmptyLatentImage's VAE ratio, for fix_empty_latent_channels)
SAMPLER_ONLY_KEYS = ("downscale_ratio_spacial",)


def latent_samples(model, latent):
    """The LATENT's samples as ComfyUI's samplers take them: an empty latent is fitted to the
    model's channels (and, on hosts whose empty latents say their VAE ratio, to its spatial ratio)."""
    import comfy.sample

    samples = latent["samples"]
    fix = getattr(comfy.sample, "fix_empty_latent_channels", None)
    if fix is None:
        return samples
    ratio = latent.get("downscale_ratio_spacial")  # set only by hosts whose fix takes it
    return fix(model, samples) if ratio is None else fix(model, samples, ratio)


def output_latent(latent, samples):
    """The output LATENT: the input's keys (batch_index, noise_mask...) with the new samples, less
    the sampler-only keys, as ComfyUI's KSampler / SamplerCustomAdvanced return it."""
    result = {key: value for key, value in latent.items() if key not in SAMPLER_ONLY_KEYS}
    result["samples"] = samples
    return result


def initial_noise(latent, seed):
    import comfy.sample

    return comfy.sample.prepare_noise(latent["samples"], seed, latent.get("batch_index"))


def _latent_preview():
    for name in ("latent_preview", "comfy.cmd.latent_preview"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def progress_callback(model, steps, on_step=None):
    """ComfyUI's progress bar + live preview callback, with an optional extra per-step hook."""
    module = _latent_preview()
    preview = module.prepare_callback(model, steps) if module is not None else None

    def callback(step, x0, x, total_steps):
        if on_step is not None:
            on_step(step, x0, x, total_steps)
        if preview is not None:
            preview(step, x0, x, total_steps)

    return callback


def progress_disabled():
    import comfy.utils

    return not getattr(comfy.utils, "PROGRESS_BAR_ENABLED", True)


def ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, sigmas,
            denoise=1.0, callback=None, add_noise=True, start_step=None, last_step=None, force_full_denoise=False):
    """comfy.sample.sample with an explicit schedule; returns the output LATENT dict. add_noise,
    start_step, last_step, force_full_denoise: KSamplerAdvanced's controls (ComfyUI cuts `sigmas`)."""
    import comfy.sample
    import torch

    samples = latent_samples(model, latent)
    if add_noise:  # noise of the model's latent shape, as KSampler makes it (Qwen-Image adds a frame axis)
        noise = initial_noise({**latent, "samples": samples}, seed)
    else:  # KSamplerAdvanced's add_noise "disable"
        noise = torch.zeros(samples.size(), dtype=samples.dtype, layout=samples.layout, device="cpu")
    # ComfyUI may set the cut schedule's last sigma to 0 in place: give it a copy
    out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler,
                              positive, negative, samples, denoise=denoise, disable_noise=not add_noise,
                              start_step=start_step, last_step=last_step, force_full_denoise=force_full_denoise,
                              noise_mask=latent.get("noise_mask"), sigmas=None if sigmas is None else sigmas.clone(),
                              callback=callback or progress_callback(model, steps),
                              disable_pbar=progress_disabled(), seed=seed)
    return output_latent(latent, check_finite(out, "the sampled latent"))  # checked once, after sampling
