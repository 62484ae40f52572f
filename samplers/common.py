"""Sampling plumbing shared by the pack's samplers: schedule, noise, progress/preview, KSampler."""
import importlib


def schedule(model, steps, sampler_name, scheduler, denoise=1.0):
    """The sigmas ComfyUI's KSampler would use for these settings (denoise already applied)."""
    import comfy.samplers

    ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    return ksampler.sigmas


def latent_samples(model, latent):
    import comfy.sample

    samples = latent["samples"]
    fix = getattr(comfy.sample, "fix_empty_latent_channels", None)
    return fix(model, samples) if fix is not None else samples


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
            denoise=1.0, callback=None):
    """comfy.sample.sample with an explicit schedule; returns the output LATENT dict."""
    import comfy.sample

    samples = latent_samples(model, latent)
    # noise of the model's latent shape, as KSampler makes it (Qwen-Image adds a frame axis)
    noise = initial_noise({**latent, "samples": samples}, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler,
                              positive, negative, samples, denoise=denoise,
                              noise_mask=latent.get("noise_mask"), sigmas=sigmas,
                              callback=callback or progress_callback(model, steps),
                              disable_pbar=progress_disabled(), seed=seed)
    result = dict(latent)
    result["samples"] = out
    return result
